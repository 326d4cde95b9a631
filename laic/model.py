"""The LAIC estimator: language-assisted image clustering on precomputed CLIP image and noun embeddings.

    from laic import LAIC
    model = LAIC(n_clusters=10, random_state=0).fit(image_features, noun_features, noun_names)
    LAIC(n_clusters="auto").fit(...).n_clusters_     # K chosen without labels; k_scores_ holds the curve
    model.labels_, model.cluster_names_, model.predict(new_features), model.predict_proba(new_features)
    model.cluster_sizes_    # images per cluster; an empty one has no names and predict assigns nothing to it
    model.save("run/model"); LAIC.load("run/model")

``fit`` runs stage 0 (``laic.stage0``: centring, noun filtering, text counterparts, neighbour graphs, the agreement
of the text and image spaces, spherical k-means on the fused space) and stage 1 (``laic.stage1``: the image and text
heads). Stage 2 (fine-tuning the vision encoder on the model's confident clusters, ``laic.stage2``) runs through
``fit_images`` on image files; ``predict_images`` then assigns new images with the fine-tuned encoder.
No labels are used anywhere.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import numbers
import operator
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from laic_kernels import checks
from laic_kernels.chunks import row_chunks

from . import io, model_file, profiling, relations as relational, select_k
from .assignment import without_empty_clusters
from .distributed.fit import check_compute_device, fit_group, total_rows
from .distributed.batch import group_of
from .distributed.failure import same_on_all_ranks, stop_all_on_failure, warn_from_main
from .distributed.rows import RowBlocks
from .inputs import as_tensor, checked_inputs, column_names, distinct_nouns
from .refine import check_one_process, check_options as check_refine_options, refine_partition
from .semantic_centres import names_by_score, nearest_noun_names
from .kmeans import cluster_sums
from .operands import BLOCK_ELEMENTS
from .runtime import (MAX_SEED, checked_threads, cpu_threads, fitting_device, own_grad_and_precision,
                      warn_at_caller)
from .stage0 import (NOUNS_PER_CENTRE, N_NEIGHBOURS, PARTITION_AGREEMENT_RAMP, TEXT_TAU, build_semantic_space,
                     centre_features, fused_features, spherical_kmeans, text_features, unit_rows)
from .stage1 import (MIN_IMAGES_PER_CLUSTER, Stage1Config, combined_probabilities, n_used, stage1_decision,
                     train_heads)

N_CLUSTER_NAMES = 5
FUSED_TEMPERATURE = 0.01
# text_tau over which the dev sets' fits kept their text side (cifar10-500: ACC 88-89 from 1e-4 to 0.01, 81 at 0.02,
# image-only from 0.05): the no-agreement warning names text_tau above it.
TEXT_TAU_WORKING = (1e-4, 0.02)
# The NMI of the images' partition and random nouns' from which the partition test says nothing of the nouns
# (_warn_if_the_partitions_disagree): random nouns already give the images' partition.
PARTITION_NULL_SAYS_NOTHING = 0.95
# The smallest text_tau accepted: at 1e-6 the softmax over cosines in [-1, 1] is already a hard choice (below about
# 1e-39 the products over it overflow float32).
MIN_TEXT_TAU = 1e-6
# How far below the fitted images' lowest cosine to their mean direction new features may fall before predict warns
# that they look foreign: rounding room (the floor's cosines differ from 1 to 10 ulp with the rows scored together).
FOREIGN_MARGIN = 1e-4
# Settings each rank of a process group may choose for itself: where and how fast it computes, not the result.
PER_RANK_SETTINGS = ("device", "n_threads", "profile")


@dataclass
class FitTrace:
    """What a fit computed for its training images and stage 2 reuses (see :meth:`LAIC.fit_trace`)."""

    text_counterparts: np.ndarray   # float32 [N, D]: each image's unit softmax mixture of the kept nouns (uncentred)
    probabilities: np.ndarray       # float32 [N, K]: the fitted model's soft assignment (what predict_proba gives)


def agreement_report(space, use_text: bool, partition_weighting: bool) -> dict:
    """How stage 0 weighted the text side (``LAIC.agreement_report_``): the neighbour agreement (raw, its random-noun
    null, calibrated), the partition agreement and the share of the neighbour agreement it kept, and the result
    (with ``use_text=False`` the share is 0; without ``partition_weighting`` it is 1; in either case the partition
    agreement is not measured)."""
    return {"use_text": bool(use_text), "partition_weighting": bool(partition_weighting),
            "agreement": float(space.agreement), "neighbour_agreement": float(space.neighbour_agreement),
            "raw_neighbour_agreement": float(space.raw_agreement),
            "null_neighbour_agreement": float(space.null_agreement),
            "partition_agreement": float(space.partition_agreement),
            "text_weight_factor": float(space.text_weight_factor)}


MIN_IMAGES = 3   # K = 2 clusters and one image more: with fewer, every partition is as good as any other


def _cluster_sizes(labels: torch.Tensor, k: int, rows: RowBlocks) -> List[int]:
    """Images per cluster, over every rank's rows."""
    return rows.sum_(torch.bincount(labels, minlength=k)).cpu().tolist()


def default_n_init(n_clusters: int) -> int:
    """Restarts of the fused k-means: 10 (as scikit-learn's classic default) up to 100 clusters; with more clusters
    one restart's objective already averages over many clusters, so 3 suffice (and keep large K affordable)."""
    return 10 if n_clusters <= 100 else 3


def _constructor_names(cls) -> Tuple[str, ...]:
    """The options ``cls``'s constructor takes by name: those it names, and where it also takes ``**kwargs``, those
    of the constructor above it in its classes (taken to be where ``super().__init__`` passes them: a subclass of
    a subclass that fixes some of LAIC's options takes what that one takes)."""
    classes = cls.__mro__
    owner = next(klass for klass in classes if "__init__" in vars(klass))
    if owner is object:
        return ()
    parameters = inspect.signature(owner.__init__).parameters.values()
    named = tuple(p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    if not any(p.kind == p.VAR_KEYWORD for p in parameters):
        return named
    above = _constructor_names(classes[classes.index(owner) + 1])
    return named + tuple(name for name in above if name not in named)


def _constructor_defaults(cls) -> Dict[str, object]:
    """The named parameters of ``cls``'s constructor (not ``*args`` or ``**kwargs``) and their defaults."""
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


class LAIC:
    """Language-assisted image clustering.

    Args:
        n_clusters: number of clusters K (2 <= K <= number of images), or "auto": K is chosen without labels by
            ``laic.select_k`` (a silhouette gap of the fused partition over ``k_range``); the K used is
            ``n_clusters_`` and every candidate's score is in ``k_scores_``.
        k_range: with n_clusters="auto", the (lo, hi) range searched (default 2 to N // 4, at most 2048; at
            most N - 1).
        random_state: seed of everything random (k-means seeding, noun filtering, head initialisation, batches).
        device: where to compute ("cpu", the default, "cuda", "cuda:1", or "auto": CUDA when available; `laic fit`
            defaults to "auto").
        n_init: restarts of the fused k-means (None: 10 up to K = 100, else 3).
        n_neighbours: neighbours per image in the image and text graphs.
        text_tau: temperature of the noun mixture that makes each image's text counterpart (the dev sets' working
            range: about 1e-4 to 0.02, ``TEXT_TAU_WORKING``; far above it the counterparts approach linear maps of
            the images, which the agreement test's random vectors match as well, and the text side gets no weight).
        nouns_per_centre: nouns kept per semantic centre in the noun filtering.
        use_text: False ignores the nouns' contribution to the clustering (image-only ablation; the nouns still
            name the clusters). Stage 1's neighbour filter still takes the text graph (``neighbour_filter="none"``
            takes none: the image-only baseline of benchmarks/quality.py trains no stage 1), and
            ``relation_fused=True``, which builds the fused space from the nouns, is refused beside it.
        partition_weighting: the text weight is the neighbour agreement scaled by the partition agreement
            (``laic.stage0.partition_agreement``: whether the nouns' K-means partition follows the images' beyond
            random nouns'); False keeps the neighbour agreement alone (the ablation).
        neighbour_filter: which kNN graph keeps the image-space neighbours that stage 1 pulls together: "text" (the
            text counterparts'), "relation" (the relation features', ``laic.relations``) or "none" (all kept).
        relation_view: stage 1's second head sees the relation features (``laic.relations``) instead of the text
            counterparts (no effect where stage 1 is not trained, see ``min_cluster_size``, nor where the text side
            has no weight, ``agreement_`` 0: that head's weight).
        relation_fused: what the fused space (the fused k-means and the model without stage 1) holds for the
            images: "auto" (the default) moves it from the centred image features towards the relation features
            (``laic.relations``) by the partition agreement's factor of the text weight (all the way where the nouns'
            partition follows the images', not at all with a vocabulary of random vectors, nor without the
            partition weighting; ``relation_share_``); True: the relation features; False: the centred image
            features.
        usage_weighting: how the relation features (every use above) weight the kept nouns: "auto" (the default)
            by their usage (each noun's share of the images' softmax attention at ``text_tau``,
            ``laic.relations.noun_usage``) where the images attend to at least one noun a cluster (the usage's
            effective number of nouns over K), alike where they attend to at most half a noun a cluster
            (fine-grained classes sharing a few broad nouns), a blend of the two between
            (``laic.relations.usage_share``; ``usage_share_`` and ``attended_nouns_``); True: by the usage; False:
            alike.
        stage1_steps: about this many optimiser steps for the heads, in whole epochs, 5 to 50 of them (fewer
            where five epochs would pass 5,000 steps: one epoch at N = 1.28M; ``laic.stage1.n_epochs``: at N = 500
            and batch 256, 1 to 10 give 10 steps); 0 skips stage 1.
        min_cluster_size: skip stage 1 (to save its time) when the clusters have fewer images on average (N / K);
            default ``laic.stage1.MIN_IMAGES_PER_CLUSTER`` (8: below it stage 1 measured no gain), 0 always trains
            it. Whether its result is kept is decided without labels after training
            (``laic.stage1.stage1_decision``; the decision and its numbers are in ``stage1_report_``, and how stage 0
            weighted the text side in ``agreement_report_``). Without
            stage 1 the model assigns each image to the nearest centre of the fused k-means clusters in the fused
            (image + weighted text) space.
        batch_size, lr, anchor_weight: stage 1 settings (see ``laic.stage1.Stage1Config``).
        n_threads: CPU threads torch uses while fitting (None: ``laic.runtime.cpu_threads``' default, which
            stays fast on a machine busy with other work). Like ``device``, a setting of the machine: :meth:`load`
            resets it to None (a count of the saving machine's, refitted on a smaller one, was refused); set it again
            where a refit must repeat the saved fit's probabilities to the last digit. It is torch's count, one for
            the process: fits running at once in its threads share it (the one set last holds).
        profile: record wall time and peak extra memory of each step of ``fit`` in ``profile_`` (``laic.profiling``;
            ``laic.profiling.write`` saves it with a Chrome trace). ``fit_images`` records its whole run in one
            profile: stages 0 and 1 as ``fit`` does, the embedding of the images, and one "stage-2" step per
            fine-tuning epoch it runs (a resumed run: the epochs left); there the Chrome trace is recorded on the CPU
            only (on CUDA it would grow with every training step; the per-step figures come from CUDA's counters).
        pseudo_labels: "kmeans" (default: the partition of stages 0 and 1) or "semantic": SIC's pseudo-labels from
            image-semantic relations and its consistency learning, kept when stage 1's label-free test accepts them
            (``laic.pseudo_labels``; the report is in ``refine_report_``).
        semantic_centres: True learns Ma et al.'s adaptive semantic centres after the partition and assigns by cosine
            to them (``laic.semantic_centres``: prompts through the frozen text tower in ``fit_images``, continuous
            centres in the text embedding space otherwise); the clusters are then named by the nouns nearest them.

    Memory of ``fit`` beyond its inputs (N images of dimension D, K clusters, k = n_neighbours; N x D floats are
    4 N D bytes in float32; C = a reference kernel's row chunk, at most 256 MB): stage 0 keeps 4 N x D floats (unit
    and centred images, text counterparts) and 4 N x k neighbour lists; each step adds at most, while it runs:
    noun filtering 2 N x D; text counterparts 4 N x D; neighbour graphs 4 N x D + C / 2 (a quarter-chunk tile of the
    symmetric backend, and its mask; where a tenth or more of the rows are copies, the distinct images' own graphs
    after them: 2 N x D more, laic.stage0.COPIED_SHARE_COUNTED_ONCE); random-noun agreement
    2 N x D + 2 C + M x D (a random vocabulary of the nouns' size M); partition agreement 2 N x D + one 64 MB block
    (the random nouns' text counterparts, kept from the step before, and a k-means at a time); fused features
    2 N x D (its output; fewer columns where the kept nouns' span is smaller: laic.stage0.fused_features) + one
    64 MB block; fused k-means 2 N x D + one 64 MB block;
    stage 1 one N x K float matrix at its end (the heads' combined probabilities, the fit's output, made in
    blocks of rows; the anchor is one-hot per batch only), its batches and, once an epoch, every row's neighbour
    draw (a few N x k integers while it is made), the fused space (2 N x D) kept for its decision; and each step's
    consistency loss a few 2K x 2K and K x K matrices (its cluster-level terms compare every cluster with every
    other: about 64 K^2 bytes, and K^2 time, a step. On one CPU thread, ad hoc timings: a whole step 0.19 s at
    K = 1000; the loss alone, forward and backward at B = 256, 0.8-1.4 s at K = 2000 and 5.5-7 s at 5000, where a
    fit at N = 8 K runs 5 epochs of N / 256 steps; on the H200 a whole step at K = 1000 took 2.6 ms,
    benchmarks/RESULTS.md). Where
    the fused space takes a share of the relation features (``relation_share_`` > 0) they are made after stage 0:
    N x D and a D x D map (``laic.relations``; never an N x M' matrix; unless ``usage_weighting=False`` the nouns'
    usage is one more pass over the images in 64 MB blocks), and at a share between 0 and 1 the blended image part
    another N x D; likewise for ``relation_view``; the "relation" neighbour filter makes them in stage 0. Peak: about
    8 N x D + 4 N x k + 2 C (CPU, measured by ``benchmarks/scale.py``: 797 MB at N = 25,000, D = 512, K = 100,
    whose nouns take no share; tests/test_scale.py checks the bound at small N with small chunks). On CUDA the
    kernel operands are half precision (the searches also keep their float32 rows, to choose among the candidates:
    laic.operands.top_similar) and the fused kernels need no chunk C. Nothing is of size N x N, N x M or N x k x D.
    """

    def __init__(self, n_clusters: Union[int, str] = 10, random_state: int = 0, device: str = "cpu", *,
                 n_init: Optional[int] = None, n_neighbours: int = N_NEIGHBOURS, text_tau: float = TEXT_TAU,
                 nouns_per_centre: int = NOUNS_PER_CENTRE, use_text: bool = True, stage1_steps: int = 50,
                 min_cluster_size: int = MIN_IMAGES_PER_CLUSTER, batch_size: int = 256, lr: float = 1e-3,
                 anchor_weight: float = 0.8,
                 k_range: Optional[Tuple[int, int]] = None, n_threads: Optional[int] = None,
                 profile: bool = False, pseudo_labels: str = "kmeans", semantic_centres: bool = False,
                 neighbour_filter: str = "text", relation_view: bool = False,
                 relation_fused: Union[str, bool] = "auto", partition_weighting: bool = True,
                 usage_weighting: Union[str, bool] = "auto"):
        self.n_clusters = n_clusters
        self.k_range = k_range
        self.random_state = random_state
        self.device = device
        self.n_init = n_init
        self.n_neighbours = n_neighbours
        self.text_tau = text_tau
        self.nouns_per_centre = nouns_per_centre
        self.use_text = use_text
        self.stage1_steps = stage1_steps
        self.min_cluster_size = min_cluster_size
        self.batch_size = batch_size
        self.lr = lr
        self.anchor_weight = anchor_weight
        self.n_threads = n_threads
        self.profile = profile
        self.pseudo_labels = pseudo_labels
        self.semantic_centres = semantic_centres
        self.neighbour_filter = neighbour_filter
        self.relation_view = relation_view
        self.relation_fused = relation_fused
        self.partition_weighting = partition_weighting
        self.usage_weighting = usage_weighting

    # -- options ---------------------------------------------------------------------------------------------------

    _PARAMS = ("n_clusters", "random_state", "device", "n_init", "n_neighbours", "text_tau", "nouns_per_centre",
               "use_text", "stage1_steps", "min_cluster_size", "batch_size", "lr", "anchor_weight", "k_range",
               "n_threads", "profile", "pseudo_labels", "semantic_centres", "neighbour_filter", "relation_view",
               "relation_fused", "partition_weighting", "usage_weighting")

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's options (scikit-learn's protocol: ``clone`` works, and grid searches given the nouns by
        keyword, ``GridSearchCV(LAIC(...), grid, scoring=a_function).fit(X, noun_features=V)``, which scikit-learn
        splits by fold where V has as many rows as X (drop a noun row there); fit's second argument is
        the nouns, so a ``Pipeline`` passes them as its ``y``, ``pipeline.fit(X, V, laic__noun_names=names)``, not by
        keyword; ``deep`` changes nothing, LAIC holds no other estimator)."""
        return {name: getattr(self, name) for name in self._param_names() if hasattr(self, name)}

    def laic_options(self) -> dict:
        """LAIC's own options: what a fit runs with (``fit_params_``), what a model file records and what the ranks
        of a process group compare. A subclass's own options (:meth:`get_params`) are none of these."""
        return {name: getattr(self, name) for name in LAIC._PARAMS}

    @classmethod
    def _param_names(cls) -> tuple:
        """The options :meth:`get_params` and :meth:`set_params` take: as scikit-learn reads an estimator's
        parameters, those its constructor takes by name (:func:`_constructor_names`: with ``**kwargs``, those of
        the constructor it passes them to), each the instance's attribute of its name (one it lacks is left out);
        LAIC's own first. A subclass's own options were reset by ``clone`` to their defaults without a word; a
        subclass that fixes some of LAIC's (``def __init__(self, random_state=0)``) was cloned with all of LAIC's and
        refused them. One that fixes some and passes ``**kwargs`` on is taken to take them all (``clone`` then
        gives it an option twice): name the options it takes instead."""
        names = _constructor_names(cls)
        return (tuple(name for name in LAIC._PARAMS if name in names)
                + tuple(name for name in names if name not in LAIC._PARAMS))

    def set_params(self, **params) -> "LAIC":
        """Set constructor options by name (checked at the next fit, as the constructor's are); returns the model."""
        names = self._param_names()
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no option {', '.join(map(repr, unknown))}; its options are "
                             f"{', '.join(names)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        """The options that differ from the defaults, as scikit-learn shows an estimator: ``LAIC(n_clusters=100)``."""
        defaults = {**_constructor_defaults(LAIC), **_constructor_defaults(type(self))}
        shown = [f"{name}={value!r}" for name, value in self.get_params().items()
                 if not (name in defaults and type(value) is type(defaults[name]) and value == defaults[name])]
        return f"{type(self).__name__}({', '.join(shown)})"

    # What scikit-learn before 1.6 reads to tell a clusterer (is_clusterer; its scorers): it calls no tags.
    _estimator_type = "clusterer"

    def __sklearn_tags__(self):
        """scikit-learn's tags (its ``check_is_fitted`` and ``is_clusterer`` read them; only scikit-learn calls
        this, so only then is it imported)."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type="clusterer", target_tags=TargetTags(required=False))

    def __getstate__(self) -> dict:
        """Pickling and copies leave out the profiler of a ``profile=True`` fit (torch's trace cannot be pickled;
        ``profile_``, its summary, stays)."""
        state = dict(self.__dict__)
        state.pop("profiler_", None)
        return state

    def torch_device(self) -> torch.device:
        """The device the model computes on (``device``, resolved: "auto" is CUDA when available)."""
        return fitting_device(self.device)

    def _stage1_config(self) -> Stage1Config:
        return Stage1Config(target_steps=max(1, operator.index(self.stage1_steps)),
                            batch_size=operator.index(self.batch_size), lr=self.lr, anchor_weight=self.anchor_weight)

    def _check_options(self, n_images: int, distributed: bool = False) -> None:
        if select_k.is_auto(self.n_clusters):
            select_k.check_k_range(self.k_range, n_images)
        else:
            if isinstance(self.n_clusters, str):
                raise ValueError(f"n_clusters must be an int or 'auto', got {self.n_clusters!r}")
            checks.int_in_range("n_clusters", self.n_clusters, 2, n_images, f" (2 <= n_clusters <= number of images "
                                f"N = {n_images}), or 'auto'", type_hint=", or 'auto'")
            if self.k_range is not None:
                raise ValueError("k_range only applies with n_clusters='auto'; drop it or set n_clusters='auto'")
        self._check_settings()
        if distributed:
            check_one_process(self.semantic_centres, self.pseudo_labels)

    def _check_settings(self) -> None:
        """The options but n_clusters and k_range (which need N), each alone and together."""
        seed_only = " (an int seed: None and numpy RandomState objects are not accepted)"
        checks.int_in_range("random_state", self.random_state, 0, MAX_SEED, seed_only, seed_only)
        if self.n_init is not None:
            checks.int_in_range("n_init", self.n_init, 1, 1000,
                                type_hint=" (or None for LAIC's default: 10, 3 above K = 100)")
        checks.int_in_range("n_neighbours", self.n_neighbours, 1, 1000)
        checks.int_in_range("nouns_per_centre", self.nouns_per_centre, 1, 10**6)
        checks.int_in_range("stage1_steps", self.stage1_steps, 0, 10**7)
        checks.int_in_range("min_cluster_size", self.min_cluster_size, 0, 10**7)
        checks.int_in_range("batch_size", self.batch_size, 2, 10**7)
        for name in ("text_tau", "lr", "anchor_weight"):   # a Fraction or Decimal passed the checks, then failed
            value = getattr(self, name)                     # inside torch's arithmetic
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float, np.integer, np.floating)):
                raise ValueError(f"{name} must be a float, got {type(value).__name__} {value!r}; pass float({name})")
        checks.positive("text_tau", self.text_tau)
        if self.text_tau < MIN_TEXT_TAU:
            raise ValueError(f"text_tau must be at least {MIN_TEXT_TAU:g} (at that temperature the softmax over "
                             f"cosines already takes the nearest noun alone), got {self.text_tau!r}")
        checks.positive("lr", self.lr)
        weight = self.anchor_weight
        if not checks.is_real(weight) or not 0.0 <= weight <= 1.0:
            raise ValueError(f"anchor_weight must be a number in [0, 1], got {weight!r}")
        check_refine_options(self.semantic_centres, self.pseudo_labels)
        relational.check_neighbour_filter(self.neighbour_filter)
        for name in ("use_text", "relation_view", "partition_weighting", "profile"):
            checks.true_or_false(name, getattr(self, name))
        relational.check_auto_switch("relation_fused", self.relation_fused)
        relational.check_auto_switch("usage_weighting", self.usage_weighting)
        if not self.use_text and relational.switched_on(self.relation_fused):
            raise ValueError("use_text=False (--set use_text=False: the image-only ablation) and relation_fused=True "
                             "(--relation-fused on: a fused space made of the nouns' relation features) contradict "
                             "each other: the nouns changed 456 of 500 labels of such an 'image-only' fit; leave "
                             "relation_fused at 'auto' (no share without the text side) or False (off)")

    def _space_options(self) -> dict:
        """build_semantic_space's options from this model's."""
        # Integer options as Python ints: numpy's small ones (np.int8(3)) pass the checks, then overflowed inside
        # the arithmetic they enter (numpy 2 keeps their type).
        return {"n_neighbours": operator.index(self.n_neighbours), "tau": self.text_tau,
                "nouns_per_centre": operator.index(self.nouns_per_centre),
                "neighbour_filter": self.neighbour_filter,
                "use_text": self.use_text, "partition_weighting": self.partition_weighting,
                "usage_weighting": self.usage_weighting}

    # -- fitting ---------------------------------------------------------------------------------------------------

    def fit(self, image_features, noun_features, noun_names: Optional[Sequence[str]] = None) -> "LAIC":
        """Cluster ``image_features [N, D]`` with the help of ``noun_features [M, D]`` (CLIP text embeddings of a
        noun vocabulary, same model). ``noun_names`` (M strings) name the clusters; default "noun_<i>".

        Inside an initialised ``torch.distributed`` process group every rank passes its own block of image rows
        (in rank order they are the data set) and the same nouns; ``labels_`` then holds the rank's own rows'
        labels, everything else is the same on every rank (``laic.distributed.fit``, ``gather_labels``).

        The caller's ``torch.no_grad()``, ``inference_mode()`` and autocast do not apply inside (as in every entry
        point here: ``runtime.own_grad_and_precision``)."""
        self._check_process_settings()
        with cpu_threads(self.n_threads):
            self._fit(image_features, noun_features, noun_names)
        return self

    def fit_trace(self, image_features, noun_features, noun_names: Optional[Sequence[str]] = None,
                  text_tower=None) -> FitTrace:
        """:meth:`fit`, and what it computed for the training images: their text counterparts and their cluster
        probabilities (stage 2 starts from both, instead of computing them again). ``text_tower``
        (``(open_clip model, tokenizer)``) is what semantic_centres=True learns prompts with."""
        self._check_process_settings()
        with cpu_threads(self.n_threads):
            space, probs = self._fit(image_features, noun_features, noun_names, keep_raw_texts=True,
                                     text_tower=text_tower)
        return FitTrace(space.raw_texts.cpu().numpy(),
                        without_empty_clusters(probs.cpu().numpy(), self.cluster_sizes_))

    def _check_process_settings(self) -> None:
        """The settings each process of a group may choose alone (n_threads, profile, device), checked on every rank
        together: a bad one raised on its rank alone, and the others waited in the fit's first collective until its
        timeout."""
        def check():
            if self.n_threads is not None:
                checked_threads(self.n_threads, "n_threads")
            checks.true_or_false("profile", self.profile)
            self.torch_device()

        stop_all_on_failure(fit_group(), check, "checking LAIC's settings of each process")

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """The fitted attributes are set one by one along the way: a fit that fails or is interrupted inside this
        block puts back the model as it was (fitted or not), never half of a new fit beside half of an old one."""
        before = dict(self.__dict__)
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def fit_predict(self, image_features, noun_features, noun_names: Optional[Sequence[str]] = None) -> np.ndarray:
        """:meth:`fit`, then ``labels_`` (on a process group: this rank's rows')."""
        return self.fit(image_features, noun_features, noun_names).labels_

    def _fit(self, image_features, noun_features, noun_names, keep_raw_texts: bool = False, text_tower=None):
        checks.true_or_false("profile", self.profile)   # before the recording that it switches on
        with self._all_or_nothing(), own_grad_and_precision():   # fit and fit_trace alike
            # Inside fit_images' recording (stages 0 to 2) this records into that one (profiling.fit_recording).
            with profiling.fit_recording(self):
                return self._fit_stages(image_features, noun_features, noun_names, keep_raw_texts, text_tower)

    def _fit_stages(self, image_features, noun_features, noun_names, keep_raw_texts: bool, text_tower=None):
        group = fit_group()   # on a process group each rank holds its own image rows (laic.distributed.fit)
        images, nouns, noun_names, columns = self._fit_inputs(image_features, noun_features, noun_names, group)
        self._keep_column_names(columns)
        # The options this fit ran with (checked): predict and save read these, so that set_params after a fit
        # changes the next fit only, as in scikit-learn, never the fitted model's predictions or its file.
        self.fit_params_ = self.laic_options()
        device = self.torch_device()
        # A new fit makes any stage-2 result stale (it was trained on the previous partition), and the previous
        # fit's profile (this fit records its own only with profile=True).
        for stale in ("stage2_", "profile_", "profiler_"):
            self.__dict__.pop(stale, None)
        images, nouns = images.to(device), nouns.to(device)
        seed = int(self.random_state)
        # The inputs were checked once above: the kernels need not scan them again at every call.
        with checks.values_checked():
            k, self.k_scores_ = self._choose_k(images, nouns, seed, group)
            self.n_clusters_ = k
            space, fused_space, fused, anchor = self._stage0(images, nouns, k, seed, keep_raw_texts, group)
            self._keep_space(space, images, noun_names, group)
            probs = self._stage1(space, fused_space, fused, anchor.labels, k, seed)
            probs, sizes_before_refinement = self._refine(space, images, fused, probs, k, seed, text_tower)
        self._keep_labels(probs, k, space.rows)
        used_by_kmeans = n_used(anchor.labels, k, space.rows)      # over every rank's rows
        warn_from_main(group_of(space.rows),
                       lambda: self._warn_empty_clusters(k, used_by_kmeans, sizes_before_refinement))
        return space, probs

    def _stage0(self, images: torch.Tensor, nouns: torch.Tensor, k: int, seed: int, keep_raw_texts: bool, group):
        """Stage 0: the semantic space (with its relation features where they are used), the fused features and
        their k-means partition, the anchor of everything after. Returns (space, fused_space, fused, anchor); sets
        relation_share_, relation_map_, usage_share_ and attended_nouns_."""
        space = build_semantic_space(images, nouns, k, seed=seed, keep_raw_texts=keep_raw_texts, group=group,
                                     **self._space_options())
        n_init = operator.index(self.n_init or default_n_init(k))
        # Without the partition weighting (its ablation) the partition agreement is not measured: no evidence
        # that the nouns' view follows the images', so "auto" takes none of it.
        partition_factor = space.text_weight_factor if self.partition_weighting else 0.0
        self.relation_share_ = relational.relation_share(self.relation_fused, partition_factor,
                                                         space.nouns.shape[0])
        few_nouns = relational.few_nouns_warning(self.relation_fused, self.relation_share_, space.nouns.shape[0],
                                                 nouns.shape[0])
        if few_nouns is not None:
            warn_from_main(group, lambda: warn_at_caller(few_nouns))
        if self.relation_share_ > 0 or self.relation_view:
            # Made after stage 0's own steps, and only where the fused space takes a share of them or stage 1
            # sees them: they are not held through stage 0's largest steps, nor made for nothing.
            space = relational.with_relations(space, self.usage_weighting, self.text_tau, k)
        self.relation_map_ = space.relation_map
        weighting = space.noun_weighting
        self.usage_share_ = 0.0 if weighting is None else weighting.share
        self.attended_nouns_ = float("nan") if weighting is None else weighting.attended
        with profiling.step("fused features", "other"):
            fused_space = relational.fused_view(space, self.relation_share_)
            fused = fused_features(fused_space, k)
        with profiling.step("fused k-means", "k-means"):
            anchor = spherical_kmeans(fused, k, n_init=n_init, seed=seed, group=group)
        return space, fused_space, fused, anchor

    def _keep_space(self, space, images: torch.Tensor, noun_names: Sequence[str], group) -> None:
        """The parts of the semantic space that predict, the cluster names and the agreement diagnostics read, and
        n_features_in_; warns where the nouns agree with the images no better than random vectors."""
        self.image_mean_ = space.mean
        self.text_mean_ = space.text_mean
        cosines = self._mean_cosines(images)
        self.image_floor_ = float(space.rows.take(cosines, space.rows.smallest(cosines, 1))[0])
        self.nouns_ = space.nouns
        self.noun_names_ = [str(noun_names[i]) for i in space.noun_index.tolist()]
        self.agreement_ = float(space.agreement)
        self.agreement_report_ = agreement_report(space, self.use_text, self.partition_weighting)
        if self.use_text:
            self._warn_if_the_nouns_say_nothing(space, group, self.text_tau, self.partition_weighting,
                                                self.n_clusters_)
        self.n_features_in_ = int(images.shape[1])

    def _stage1(self, space, fused_space, fused: torch.Tensor, anchor_labels: torch.Tensor, k: int,
                seed: int) -> torch.Tensor:
        """Stage 1: the heads, trained from the k-means anchor where there are images enough a cluster, kept where
        stage1_decision takes them; otherwise the anchor's fused centres assign. Returns the soft assignment."""
        result, self.stage1_report_ = None, {"ran": False, "kept": False}
        rows = space.rows
        if self.stage1_steps > 0 and rows.n_rows / k >= self.min_cluster_size:
            with profiling.step("stage 1 (heads)", "stage-1"):
                heads_space = relational.relation_view(space) if self.relation_view else space
                result = train_heads(heads_space, anchor_labels, k, seed=seed, config=self._stage1_config())
            self.stage1_report_ = stage1_decision(fused, anchor_labels, result.labels, k, rows)
        if self.stage1_report_["kept"]:
            self.image_head_, self.text_head_ = result.image_head, result.text_head
            self.centres_ = result.centres
            self.fused_centres_ = None
            self.history_ = result.history
            return result.probabilities
        self.image_head_ = self.text_head_ = None
        self.centres_ = unit_rows(rows.sum_(cluster_sums(space.images, anchor_labels, k)))
        self.fused_centres_ = unit_rows(rows.sum_(cluster_sums(self._fused(fused_space.images, space.texts),
                                                               anchor_labels, k)))
        self.history_ = {}
        return self._fused_probabilities(fused_space.images, space.texts)

    def _refine(self, space, images: torch.Tensor, fused: torch.Tensor, probs: torch.Tensor, k: int, seed: int,
                text_tower):
        """The pseudo-label and semantic-centre refinements where chosen (laic.refine). Returns the soft assignment
        and the cluster sizes before the refinement (None without one), for the empty-cluster warning."""
        self.assignment_, self.refine_report_ = None, {}
        if self.pseudo_labels == "kmeans" and not self.semantic_centres:
            return probs, None
        sizes_before = _cluster_sizes(probs.argmax(1), k, space.rows)
        with profiling.step("pseudo-labels / semantic centres", "stage-1"):
            self.assignment_, probs, self.refine_report_ = refine_partition(self, space, images, fused, probs, k,
                                                                            seed, text_tower)
        return probs, sizes_before

    def _keep_labels(self, probs: torch.Tensor, k: int, rows) -> None:
        labels = probs.argmax(1)
        self.labels_ = labels.cpu().numpy().astype(np.int64)
        # On a process group labels_ holds this rank's rows (start, stop of N): laic.distributed.gather_labels.
        self.row_block_ = (rows.start, rows.start + len(self.labels_), rows.n_rows) if rows.distributed else None
        self.cluster_sizes_ = _cluster_sizes(labels, k, rows)
        self.cluster_names_ = self._cluster_names()

    def _warn_empty_clusters(self, k: int, used_by_kmeans: int, sizes_before_refinement: Optional[List[int]]) -> None:
        """Warn when the final labels leave clusters empty that nothing recorded, naming what emptied which. k-means
        re-seeds an emptied cluster with a distinct row, so clusters it leaves empty mean fewer distinct rows than K.
        Stage 1 may empty a few by design, within its decision's bound (stage1_report_ records them: no warning).
        Otherwise the nearest fused centre on unsmoothed rows (without stage 1), or a refinement (the clusters empty
        after it that held images before it), drained them."""
        empty = {c for c, size in enumerate(self.cluster_sizes_) if size == 0}
        if not empty:
            return
        consequence = "those clusters stay empty (no names, and predict assigns nothing to them)"
        if used_by_kmeans < k:
            warn_at_caller(f"{len(empty)} of the {k} clusters hold no image: the features have fewer distinct "
                           f"groups than n_clusters (duplicate rows?); {consequence}. Choose a smaller n_clusters "
                           "(laic fit: --k)")
            return
        before = sizes_before_refinement if sizes_before_refinement is not None else self.cluster_sizes_
        empty_before = {c for c, size in enumerate(before) if size == 0}
        drained = {"the final assignment to the nearest fused centre":
                   set() if self.stage1_report_["kept"] else empty & empty_before,
                   "the refinement of the partition (pseudo_labels / semantic_centres)": empty - empty_before}
        steps = [f"{step} left {len(clusters)} empty" for step, clusters in drained.items() if clusters]
        if not steps:
            return
        n_drained = sum(len(clusters) for clusters in drained.values())
        warn_at_caller(f"{n_drained} of the {k} clusters hold no image: stage 0's k-means used all {k}, and "
                       f"{', and '.join(steps)}; {consequence}. A smaller n_clusters (laic fit: --k), or a larger "
                       f"vocabulary where few nouns were kept, may use every cluster")

    @staticmethod
    def _warn_if_the_nouns_say_nothing(space, group, text_tau: float, partition_weighting: bool,
                                       n_clusters: int) -> None:
        """Real nouns of the images' own CLIP model make an image's text-space neighbours its image-space neighbours
        1.8 to 5 times as often as random vectors filtered alike do (the 8 dev sets, ImageNet-4shot the 5). Nouns
        that do no better (another model's text embeddings, a vocabulary that one noun near every image dominates)
        weigh nothing in the fit, which is then image-only, but they still name the clusters: say so. (Image
        embeddings passed as nouns can do better: caltech101-test's images as the nouns of cifar10-500 agreed 0.226
        against random nouns' 0.119, a text weight of 0.12, no warning; 12-07, seed 0.) A ``text_tau`` far above the
        default is a cause of its own: the counterparts then approach linear maps of the images, which random vectors
        match as well (cifar10-500: none at 0.05, ACC 88 -> 75.6). Nouns whose K-means partition follows the images'
        hardly better than random nouns' also give the text side no weight
        (:func:`_warn_if_the_partitions_disagree`)."""
        if space.raw_agreement > space.null_agreement:
            if partition_weighting and space.text_weight_factor == 0:
                LAIC._warn_if_the_partitions_disagree(space, group, n_clusters)
            return
        figures = f"neighbour agreement {space.raw_agreement:.3f}, random nouns {space.null_agreement:.3f}"
        # (The agreement counts each image once where many rows are copies: laic.stage0.COPIED_SHARE_COUNTED_ONCE.)
        others = space.agreement_images - 1
        k = min(space.image_neighbours.shape[1], others)
        copies = "" if others + 1 == space.rows.n_rows else \
            f" (the {space.rows.n_rows} rows hold {others + 1} distinct images, each counted once)"
        if 2 * k >= others:
            # Lists that hold half the images or more agree by chance alone about as much as real nouns can make
            # them (at most others / k times chance): the test says nothing of the nouns then (N = 12 at the default
            # 10 neighbours, or n_neighbours near N).
            said = (f"each image's neighbour lists hold {k} of the other {others} images{copies}: too many for the "
                    f"nouns to agree with them better than random vectors do ({figures}), so the text side takes no "
                    f"weight and the fit is image-only; fewer neighbours (n_neighbours; laic fit: --set "
                    f"n_neighbours=N) or more images let the nouns count")
        else:
            said = (f"the nouns agree with the images' neighbours no better than random vectors do ({figures}): the "
                    f"text side takes no weight, so the fit is image-only, and the cluster names may not describe the "
                    f"clusters. ")
            if text_tau > TEXT_TAU_WORKING[1]:
                said += (f"At text_tau={text_tau:g} (default {TEXT_TAU:g}) each text counterpart is near a linear map "
                         f"of its image, which random vectors match as well: try the default")
            else:
                said += "Are noun_features text embeddings of the images' own CLIP model?"
        warn_from_main(group, lambda: warn_at_caller(said))

    @staticmethod
    def _warn_if_the_partitions_disagree(space, group, n_clusters: int) -> None:
        """The nouns agree with the images' neighbours, but their K-means partition follows the images' hardly
        better than random nouns' (``laic.stage0.partition_agreement`` at or below the text weight's ramp): the fit
        is image-only, and the names it gives may not describe the clusters. Never on the 7 dev sets below K = 1000
        with their 1403 nouns (partition agreement 0.24 to 0.74 at seeds 0 and 1, 12-08); seen with fewer nouns
        than clusters (2 to 5 for K = 10) and with a constant added to every image value (cifar10-500 + 0.2: ACC
        88 -> 72, a QA helper's runs, 12-08). Not said where random nouns' partition is already the images' (NMI
        PARTITION_NULL_SAYS_NOTHING or more: clusters so plain that any vocabulary finds them, and the calibrated
        agreement is 0 whatever the nouns; a review's blobs, whose nouns named them, 12-08)."""
        if space.partition_null_nmi >= PARTITION_NULL_SAYS_NOTHING:
            return
        n_nouns = space.nouns.shape[0]
        kept = "1 noun was" if n_nouns == 1 else f"{n_nouns} nouns were"
        few = f" Only {kept} kept for {n_clusters} clusters: too few to tell them apart." \
            if n_nouns < n_clusters else ""
        said = (f"the nouns' K-means partition of the images follows the images' own hardly better than random "
                f"nouns' does (partition agreement {space.partition_agreement:.3f}; the text side counts from "
                f"{PARTITION_AGREEMENT_RAMP[0]:g}): the text side takes no weight, so the fit is image-only, and the "
                f"cluster names may not describe the clusters.{few} Do the nouns name what the images show, and are "
                "the images' features their CLIP model's own (a constant added to every value moves them off the "
                "nouns)?")
        warn_from_main(group, lambda: warn_at_caller(said))

    def _choose_k(self, images: torch.Tensor, nouns: torch.Tensor, seed: int, group=None):
        """(K, [(k, score), ...]) with n_clusters='auto' (laic.select_k on a semantic space shared by all
        candidates), else (n_clusters, None)."""
        if not select_k.is_auto(self.n_clusters):
            return int(self.n_clusters), None
        k_range = select_k.check_k_range(self.k_range, RowBlocks(images.shape[0], group).n_rows)
        with profiling.named_part("K search: "):
            space = build_semantic_space(images, nouns, select_k.search_centres_k(k_range), seed=seed, group=group,
                                         **self._space_options())
            # The fused space without the relation features: with them (moved as the fit moves its images) 18 of
            # 24 choices fell in [0.67x, 1.5x] of the true K against 21 of 24 without (quality.py --auto-k, 3
            # seeds, 12-03).
            selection = select_k.select_k(space, k_range, seed=seed)   # a step per candidate
        select_k.check_some_scored(selection)
        for warning in select_k.doubts(selection):
            warn_from_main(group, lambda: warn_at_caller(warning))
        return selection.k, selection.scores

    def _fit_inputs(self, image_features, noun_features, noun_names, group=None):
        """The inputs checked (once, here) as float32 tensors, and the noun names; on a process group ``group`` a
        bad input on one rank is an error on every rank."""
        images, nouns, noun_names, columns = stop_all_on_failure(
            group, lambda: (*checked_inputs(image_features, noun_features, noun_names),
                            column_names("image_features", image_features)), "checking LAIC.fit's inputs")
        # The nouns as given compared first: a rank alone repeating a row took the warning's collective step below
        # alone, and the ranks waited in mismatched collectives until their timeout.
        n_images = total_rows(images, nouns, group).n_rows
        nouns, noun_names, repeated = distinct_nouns(nouns, noun_names)
        if repeated:
            warn_from_main(group, lambda: warn_at_caller(
                f"noun_features repeats {repeated} of its rows (equal in float32 up to a power-of-two scale, or "
                f"under one name equal up to rounding: the same text embedding): each is used once, under its first "
                f"name ({nouns.shape[0]} distinct nouns)"))
        stop_all_on_failure(group, lambda: check_compute_device(self.torch_device(), group), "checking the device")
        stop_all_on_failure(group, lambda: relational.check_enough_nouns(
            nouns.shape[0], self.neighbour_filter, self.relation_view, self.relation_fused), "checking LAIC's options")
        if n_images < MIN_IMAGES:
            raise ValueError(f"image_features needs at least {MIN_IMAGES} rows, got {n_images}")
        # A setting refused on one rank alone left the others waiting in the next collective until its timeout.
        stop_all_on_failure(group, lambda: self._check_options(n_images, distributed=group is not None),
                            "checking LAIC's options")
        same_on_all_ranks(group, self._shared_settings(noun_names, columns))   # (NaN differs from itself)
        return images, nouns, noun_names, columns

    def _shared_settings(self, noun_names: Sequence[str], columns: Optional[np.ndarray]) -> Dict[str, object]:
        """What every rank of a process group must fit with alike (laic.distributed.same_on_all_ranks): the
        settings but those that only say where and how fast a rank computes, the noun names (the nouns' vectors
        are compared by total_rows) and the image frames' column names (feature_names_in_, the same everywhere)."""
        settings = {name: value for name, value in self.laic_options().items() if name not in PER_RANK_SETTINGS}

        def digest(names) -> Optional[str]:
            # As a JSON list: names joined by line breaks let one text split into other names pass as the same names.
            return None if names is None else hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()

        return {**settings, "noun_names": digest(noun_names), "image_features' column names": digest(columns)}

    def _fused(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Unit rows of ``[image, sqrt(agreement) * text]`` (the fused space, without neighbour smoothing)."""
        return unit_rows(torch.cat([images, math.sqrt(self.agreement_) * texts], dim=1))

    def _cluster_names(self) -> List[List[str]]:
        """Per cluster, the nouns closest to the centre that assigns it (centred image centre against centred noun
        directions; a learned semantic centre against the nouns, both in the text embedding space): where a
        refinement's assignment was kept, its centres (naming from the partition before it named clusters whose
        images it had moved)."""
        assignment = getattr(self, "assignment_", None)
        if assignment is not None and assignment.space == "clip":
            names = nearest_noun_names(assignment.centres, self.nouns_, self.noun_names_, N_CLUSTER_NAMES)
            return [row if size > 0 else [] for row, size in zip(names, self.cluster_sizes_)]
        centres = self.centres_ if assignment is None else assignment.centres
        nouns = unit_rows(self.nouns_ - self.image_mean_)
        names = names_by_score(centres @ nouns.t(), self.noun_names_, N_CLUSTER_NAMES)
        # An empty cluster is not named: k-means leaves it no centre, and the stage-1 heads' centre of a cluster
        # that holds no image describes nothing the fit found.
        named = ((centres.norm(dim=1) > 0).cpu() & (torch.tensor(self.cluster_sizes_) > 0)).tolist()
        return [row if has_centre else [] for row, has_centre in zip(names, named)]

    # -- prediction ------------------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        """Not fitted: scikit-learn's NotFittedError where scikit-learn is installed (a ValueError too), as its
        estimators raise it; a plain ValueError without it (laic does not need scikit-learn)."""
        if hasattr(self, "centres_"):
            return
        try:
            from sklearn.exceptions import NotFittedError as NotFitted
        except ImportError:
            NotFitted = ValueError
        raise NotFitted("this LAIC model is not fitted yet; call fit(image_features, noun_features) first")

    def _keep_column_names(self, names: Optional[np.ndarray]) -> None:
        """``feature_names_in_``: the fitted frame's column names (all strings, :func:`laic.inputs.column_names`), as
        scikit-learn keeps them; absent otherwise (an earlier fit's are dropped)."""
        if names is None:
            self.__dict__.pop("feature_names_in_", None)
        else:
            self.feature_names_in_ = names

    def _check_column_names(self, features) -> None:
        """``features``' column names against the fitted ones, as scikit-learn checks them: other names or another
        order is an error (the columns would be read as others: every prediction wrong without a word); names on
        one side only, a warning."""
        fitted = getattr(self, "feature_names_in_", None)
        given = column_names("features", features)
        if fitted is None and given is None:
            return
        if fitted is None:
            warn_at_caller("features has column names, but this LAIC model was fitted on features without them: "
                           "its columns are read in their order")
        elif given is None:
            warn_at_caller("features has no column names, but this LAIC model was fitted on a frame with them "
                           "(feature_names_in_): its columns are read as those, in that order")
        elif not np.array_equal(given, fitted):
            fitted_set, given_set = set(fitted.tolist()), set(given.tolist())
            unknown = [n for n in given if n not in fitted_set][:5]
            missing = [n for n in fitted if n not in given_set][:5]
            said = "; ".join(part for part in (f"not fitted on: {', '.join(unknown)}" if unknown else "",
                                               f"missing: {', '.join(missing)}" if missing else "") if part)
            raise ValueError(f"features' column names are not those the model was fitted on ({said or 'another order'}"
                             "); pass the fitted columns in their order: features[model.feature_names_in_]")

    def predict_proba(self, features) -> np.ndarray:
        """Soft cluster assignments ``[N, K]`` (rows sum to 1) of image features from the same CLIP model."""
        self._check_fitted()
        self._check_column_names(features)
        x = as_tensor("features", features, ndim=2)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"features has dimension {x.shape[1]} but the model was fitted on dimension "
                             f"{self.n_features_in_}; use features from the same CLIP model")
        x = x.to(self.centres_.device)
        with own_grad_and_precision():
            self._warn_if_foreign(x)
            probs = self._probabilities(x)
        return without_empty_clusters(probs.cpu().numpy(), self.cluster_sizes_)

    def _mean_cosines(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's cosine to the fitted images' mean direction, in row blocks (no unit copy of all N rows: at
        ImageNet scale, 1.28M x 512 float32, that would be 2.6 GB on the device by arithmetic)."""
        direction = unit_rows(self.image_mean_[None])[0]
        cosines = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for start, stop in row_chunks(x.shape[0], x.shape[1], BLOCK_ELEMENTS):
            cosines[start:stop] = unit_rows(x[start:stop]) @ direction
        return cosines

    def _warn_if_foreign(self, x: torch.Tensor) -> None:
        """Features whose mean cosine to the fitted images' mean direction is below every fitted image's are not
        what the model was fitted on (CLIP ViT-B/32: text embeddings 0.23 to 0.27, another encoder's about 0, the
        dev sets' images 0.53 to 0.87 under each other's models, each set's own lowest image 0.41 to 0.75: other
        domains' images fall below it only under the two narrow 500-image sets); they still get clusters, with a
        warning (models saved before it have no floor: no check)."""
        floor = getattr(self, "image_floor_", None)
        if floor is None:
            return
        seen = float(self._mean_cosines(x).mean())
        # A margin: a row scored alone rounds apart from the same row scored among all (1 ulp below the floor, the
        # very image that set it warned).
        if seen < floor - FOREIGN_MARGIN:
            warn_at_caller(f"these features look unlike the images the model was fitted on: their mean cosine to the "
                           f"fitted images' mean direction is {seen:.2f}, below every fitted image's ({floor:.2f}); "
                           "features of another encoder, or text embeddings? Their clusters may mean little")

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The fitted model's cluster probabilities of checked features ``x`` (on the model's device)."""
        if getattr(self, "assignment_", None) is not None:
            return self.assignment_.probabilities(x, self.image_mean_)
        images = centre_features(x, self.image_mean_)
        texts = text_features(unit_rows(x), self.nouns_, self.text_mean_, self.fit_params_["text_tau"])
        if self.image_head_ is None:
            return self._fused_probabilities(self._fused_images(images), texts)
        relation_view = self.fit_params_["relation_view"]
        second = relational.relation_features(images, self.relation_map_) if relation_view else texts
        return combined_probabilities(self.image_head_, self.text_head_, images, second, self.agreement_)

    def _fused_images(self, images: torch.Tensor) -> torch.Tensor:
        """The fused space's image part of centred image features, as the fit made it (relational.fused_view)."""
        share = self.relation_share_
        relations = relational.relation_features(images, self.relation_map_) if share > 0 else None
        return relational.blended_images(images, relations, share)

    def _fused_probabilities(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Without stage 1: a sharp softmax over the cosine to the fused centres (CLIP's logit scale, 100)."""
        sims = self._fused(images, texts) @ self.fused_centres_.t()
        return torch.softmax(sims / FUSED_TEMPERATURE, dim=1)

    def predict(self, features) -> np.ndarray:
        """Cluster ids (int64 ``[N]``) of image features from the same CLIP model."""
        return self.predict_proba(features).argmax(1).astype(np.int64)

    # -- stage 2 (laic.stage2 does the work; these are its entry points on the estimator) --------------------------

    def fit_images(self, images, noun_features, noun_names: Optional[Sequence[str]] = None, **options) -> "LAIC":
        """Stages 0 to 2 on image files: embed ``images`` (a folder or paths), :meth:`fit` on the features, then
        fine-tune the vision encoder on the pseudo-labels. ``options`` are those of
        ``laic.stage2.fit_laic_images`` (``model_name``, ``clip``, ``pretrained``, ``image_features``,
        ``stage2_config``, ``checkpoint_dir``, ``resume``, ``on_epoch_end``, ``embed_cache``). Pass ``clip`` (a
        loaded open_clip model) or ``pretrained`` (a weights file or an open_clip tag) with ``model_name``: with
        neither, the encoder's weights are random (drawn from ``random_state``; for tests, as ``laic fit --images
        --pretrained random``)."""
        from .stage2 import fit_laic_images

        with self._all_or_nothing():   # stage 2 failing after stages 0 and 1 leaves the model as it was, too
            fit_laic_images(self, images, noun_features, noun_names, **options)
        return self

    def attach_stage2(self, part, labels) -> None:
        """Keep a stage-2 result (a ``laic.stage2.Stage2Part``) and the fine-tuned ``labels`` of its images: the
        model then predicts on image files, and saves the part with itself."""
        self._check_fitted()
        labels = io.as_labels("labels", labels, non_negative=True)
        if len(labels) != len(part.image_paths):
            raise ValueError(f"labels has {len(labels)} entries but the stage-2 part has {len(part.image_paths)} "
                             "images; pass one label per image")
        self.relabel(labels)   # first: labels that do not fit the fitted images leave the model as it was
        self.stage2_ = part

    def relabel(self, labels) -> None:
        """Replace the fitted images' labels (stage 2's fine-tuned view of them; all images, also after a fit on a
        process group): the cluster sizes, and so which clusters are named and predicted, follow them."""
        self._check_fitted()
        labels = io.as_labels("labels", labels, non_negative=True)
        k, n = len(self.cluster_sizes_), sum(self.cluster_sizes_)
        if len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries but the model was fitted on {n} images; pass one "
                             "label per fitted image, in the order they were fitted")
        if labels.max() >= k:
            raise ValueError(f"labels holds cluster {labels.max()} but the model has {k} clusters (0 to {k - 1})")
        self.labels_ = labels.copy()   # as_labels keeps an int64 array the caller may reuse: the sizes follow ours
        self.row_block_ = None
        self.cluster_sizes_ = np.bincount(labels, minlength=k).tolist()
        self.cluster_names_ = self._cluster_names()

    def predict_images_proba(self, images, clip=None) -> np.ndarray:
        """Cluster probabilities ``[N, K]`` of image files with the fine-tuned encoder (after :meth:`fit_images`);
        NaN rows for images that cannot be read."""
        from .stage2 import predict_images_proba
        return predict_images_proba(self, images, clip)

    def predict_images(self, images, clip=None) -> np.ndarray:
        """Cluster ids (int64 ``[N]``) of image files with the fine-tuned encoder (after :meth:`fit_images`); -1 for
        an image that cannot be read."""
        from .stage2 import predict_images
        return predict_images(self, images, clip)

    # -- persistence (the file format is laic.model_file's) -----------------------------------------------------

    def save(self, path: Union[str, os.PathLike], overwrite: bool = False) -> None:
        """Write everything ``predict`` needs to ``path`` (one file, written atomically), with the stage-2 part
        (``laic.stage2.Stage2Part``) when the model has one. A LAIC model file already at ``path`` is replaced;
        another file only with ``overwrite=True``."""
        model_file.write(self, path, overwrite)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Optional[str] = None) -> "LAIC":
        """A model written by :meth:`save` (on ``device``, default: the CPU), with ``n_threads`` None (the saving
        machine's count is no setting of this one)."""
        return model_file.read(cls, path, device)
