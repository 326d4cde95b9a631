"""The LAIC model file (``LAIC.save`` / ``LAIC.load``, ``RUN_DIR/model``): one ``torch.save`` of plain tensors and
Python values, read with ``weights_only=True``, the stage-2 part (``laic.stage2.Stage2Part``'s state) inside."""
from __future__ import annotations

import math
import os
import pathlib
import pickle
import zipfile
from typing import Optional, Union

import numpy as np
import torch

from laic_kernels import checks

from . import io
from .runtime import first_line, warn_at_caller
from .semantic_centres import CentreAssignment
from .stage1 import ClusterHead

MODEL_FORMAT = "laic-model"
# 2: the stage-2 part is laic.stage2.Stage2Part's state. Version 1 files without a stage-2 part still load.
# 3: what versions 2 left to defaults that changed predictions (the clusters' sizes that keep empty clusters empty,
#    the relation share, the usage weighting): readers of version 2 predict such files wrongly without a word, so
#    they now refuse them. The reader takes 1 (without a stage-2 part), 2 and 3.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)


def _plain(value, where: str):
    """``value`` as what ``weights_only=True`` reads back: numpy scalars and arrays (which the options accept, e.g.
    ``use_text=np.True_``) as Python values, tuples (named ones too) as tuples; anything else is refused, naming
    ``where``, so that save never writes a file that load refuses."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, np.generic):   # long double: no Python type of its own
            value = float(value)
    if isinstance(value, torch.device):   # LAIC(device=torch.device("cuda", 1)): saved as "cuda:1"
        return str(value)
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    # Subclasses (an IntEnum, a str-valued Enum, ...) as the plain type the reader accepts, by value: str() of a
    # str-valued Enum member is its name ("Filter.TEXT"), not its value.
    for kind, plain in ((bool, bool), (int, int.__int__), (float, float.__float__), (str, str.__str__)):
        if isinstance(value, kind):
            return plain(value)
    if value is not None and not isinstance(value, torch.Tensor):
        raise ValueError(f"cannot save the model: {where} is a {type(value).__name__} ({value!r}); a model file "
                         "holds tensors, numbers, strings and lists of them")
    return value


def state(model) -> dict:
    """Everything ``predict`` needs, as plain tensors and Python values (CPU)."""
    model._check_fitted()
    if getattr(model, "row_block_", None) is not None:
        raise ValueError("this model was fitted on a process group and labels_ holds this rank's rows only; call "
                         "laic.distributed.gather_labels(model) on every rank, then save on rank 0")

    def cpu(t):
        return None if t is None else t.detach().cpu()

    def head(h):
        return None if h is None else {k: v.cpu() for k, v in h.state_dict().items()}

    params = dict(model.fit_params_)   # as fitted
    return _plain({"format": MODEL_FORMAT, "version": FORMAT_VERSION, "params": params,
            "image_mean": cpu(model.image_mean_), "text_mean": cpu(model.text_mean_), "nouns": cpu(model.nouns_),
            "feature_names_in": getattr(model, "feature_names_in_", None),
            "noun_names": model.noun_names_, "agreement": model.agreement_, "n_features_in": model.n_features_in_,
            "image_floor": getattr(model, "image_floor_", None),
            "centres": cpu(model.centres_), "fused_centres": cpu(model.fused_centres_),
            "relation_map": cpu(getattr(model, "relation_map_", None)), "relation_share": model.relation_share_,
            "usage_share": model.usage_share_, "attended_nouns": model.attended_nouns_,
            "image_head": head(model.image_head_),
            "text_head": head(model.text_head_), "labels": torch.from_numpy(model.labels_),
            "cluster_names": model.cluster_names_, "cluster_sizes": list(model.cluster_sizes_),
            "stage1_report": model.stage1_report_,
            "agreement_report": getattr(model, "agreement_report_", {}),
            "refine_report": getattr(model, "refine_report_", {}),
            "n_clusters_": model.n_clusters_, "k_scores": model.k_scores_,
            "assignment": None if getattr(model, "assignment_", None) is None else model.assignment_.state()},
                  "the model")


def write(model, path: Union[str, os.PathLike], overwrite: bool = False) -> None:
    """``model``'s :func:`state`, with its stage-2 part when it has one, to ``path`` (atomically). A file already
    there is replaced when it is a LAIC model (a model saved again) or with ``overwrite``; any other file is refused
    (``io.torch_save``'s ``replaces``)."""
    checks.true_or_false("overwrite", overwrite)
    saved = state(model)   # (an unfitted model is said so first)
    if getattr(model, "stage2_", None) is not None:
        saved["stage2"] = _plain(model.stage2_.state(), "the stage-2 part")
    io.torch_save(path, saved, replaces=None if overwrite else MODEL_FORMAT, what="a LAIC model file")


def _check_intact(path: pathlib.Path) -> None:
    """``path`` is a whole file of the kind torch.save writes whose entries match their checksums."""
    if path.is_dir():
        hint = f"; load {path / 'model'}" if (path / "model").is_file() else ""
        raise ValueError(f"{path} is a folder, not a LAIC model file{hint}")
    if not path.exists():
        raise FileNotFoundError(f"no LAIC model at {path}; write one with LAIC(...).fit(...).save(path)")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a LAIC model; save the model again")
    damage = io.torch_file_damage(path)
    if damage is not None:
        raise ValueError(f"{path} is damaged ({damage}; {size} bytes); save the model again")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a LAIC model file (not a file LAIC.save writes)")


def _load_state(path: pathlib.Path) -> dict:
    _check_intact(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refused an object: laic's files hold tensors and plain values only, and it never runs
        # code from a file to read one.
        raise ValueError(f"{path} is not a LAIC model file: it holds Python objects that a LAIC model never "
                         "contains, so it was not loaded") from None
    except Exception as exc:
        raise ValueError(f"{path} is not a LAIC model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a LAIC model file")
    version = state.get("version")
    if not checks.is_int(version):
        raise ValueError(f"{path} is not a LAIC model file (format version {version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer laic (model format version {version}; this laic reads up "
                         f"to {FORMAT_VERSION}); upgrade laic to load it")
    if version not in READABLE_VERSIONS and not (version == 1 and not state.get("stage2")):
        raise ValueError(f"{path} is a LAIC model of format version {version}, which this laic no longer reads; "
                         "refit it")
    return state


def _check_consistent(state: dict, path: pathlib.Path, known_params) -> None:
    """The parts of a model file agree with each other (a file put together by hand, or by another program)."""
    if not isinstance(state.get("params"), dict):
        raise ValueError(f"{path} is not a whole LAIC model file (its options are missing)")
    unknown = sorted(set(state["params"]) - set(known_params))
    if unknown:
        raise ValueError(f"{path} holds options this laic does not know ({', '.join(unknown)}): it was written by "
                         "a newer laic; upgrade laic to load it")
    try:
        k, dim = state["centres"].shape
        problems = [f"{name} has {len(state[name])} entries, not one per cluster ({k})"
                    for name in ("cluster_names", "cluster_sizes") if state.get(name) is not None
                    and len(state[name]) != k]
        if int(state.get("n_clusters_", k)) != k:
            problems.append(f"n_clusters_ is {state['n_clusters_']} but there are {k} centres")
        if int(state["n_features_in"]) != dim or tuple(state["image_mean"].shape) != (dim,):
            problems.append(f"the centres have dimension {dim} but n_features_in / image_mean do not")
        if state["nouns"].shape[0] != len(state["noun_names"]):
            problems.append(f"{state['nouns'].shape[0]} nouns but {len(state['noun_names'])} noun names")
        problems += _assignment_problems(state, k, dim)
    except (KeyError, AttributeError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{path} is not a whole LAIC model file ({type(exc).__name__}: {exc})") from None
    if problems:
        raise ValueError(f"{path} is not a consistent LAIC model file: {'; '.join(problems)}")


# Scalars of a model file that must be finite numbers (attended_nouns may be NaN: "not measured").
FINITE_SCALARS = ("agreement", "image_floor", "relation_share", "usage_share")
# Of those, the weights and shares a fit makes in [0, 1] (the text head's weight; the relation features' share).
SHARES = ("agreement", "relation_share", "usage_share")


def _assignment_problems(state: dict, k: int, dim: int) -> list:
    """What keeps the parts that assign a cluster (predict_proba) from fitting the centres (``k x dim``): shapes of
    the fused centres, the centre assignment, the text side and the relation map; non-finite values (a NaN mean
    made every prediction cluster 0)."""
    problems = []
    fused, assignment = state["fused_centres"], state.get("assignment")
    if fused is not None and (fused.ndim != 2 or fused.shape[0] != k):
        problems.append(f"fused_centres has shape {tuple(fused.shape)}, not {k} rows")
    if assignment and len(assignment["centres"]) != k:
        problems.append(f"the centre assignment has {len(assignment['centres'])} centres, not {k}")
    if state["image_head"] is None and fused is None and not assignment:
        problems.append("it holds no heads, no fused centres and no centre assignment: nothing assigns a cluster")
    if tuple(state["text_mean"].shape) != (dim,) or state["nouns"].ndim != 2 or state["nouns"].shape[1] != dim:
        problems.append(f"the nouns or text_mean do not have the centres' dimension {dim}")
    relation_map = state.get("relation_map")
    if relation_map is not None and tuple(relation_map.shape) != (dim, dim):
        problems.append(f"relation_map has shape {tuple(relation_map.shape)}, not ({dim}, {dim})")
    if fused is not None and fused.ndim == 2 and fused.shape[1] != 2 * dim:   # [image, text] parts, dim each
        problems.append(f"fused_centres has {fused.shape[1]} columns, not {2 * dim} (image and text parts)")
    needs_map = state.get("relation_share", 0.0) != 0 or state["params"].get("relation_view") is True
    if needs_map and relation_map is None and (fused is not None or state["image_head"] is not None):
        problems.append("it uses relation features (relation_share > 0 or relation_view) but holds no relation_map")
    problems += _predict_option_problems(state["params"])
    tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
    problems += [f"{name} is {value.dtype}, not torch.float32" for name, value in tensors.items()
                 if value.is_floating_point() and value.dtype != torch.float32]
    problems += [f"{name} holds NaN or infinite values" for name, value in tensors.items()
                 if value.is_floating_point() and not torch.isfinite(value).all()]
    problems += [f"{name} is {state[name]!r}, not a finite number" for name in FINITE_SCALARS
                 if state.get(name) is not None and not (isinstance(state[name], (int, float))
                                                         and math.isfinite(state[name]))]
    problems += [f"{name} is {state[name]!r}, not in [0, 1]" for name in SHARES
                 if isinstance(state.get(name), (int, float)) and not 0.0 <= state[name] <= 1.0]
    return problems + _label_problems(state, k)


def _predict_option_problems(params: dict) -> list:
    """What keeps the options that predict reads from being usable (text_tau=-1 loaded, then failed in predict;
    relation_view="yes" changed the predictions). Only those, and only as predict needs them: a fit's own rules,
    which change over versions (use_text=False with relation_fused=True was fitted before 12-05), are not a file's
    to meet."""
    problems = []
    tau = params.get("text_tau", 1.0)   # (an option a file's laic did not have yet takes its default)
    if not (checks.is_real(tau) and math.isfinite(tau) and tau > 0):
        problems.append(f"its option text_tau is {tau!r}, not a positive number")
    problems += [f"its option {name} is {params[name]!r}, not True or False" for name in ("relation_view", "use_text")
                 if name in params and not isinstance(params[name], (bool, np.bool_))]
    return problems


def _label_problems(state: dict, k: int) -> list:
    """What keeps the labels and cluster sizes from being those of ``k`` clusters."""
    labels, sizes = state["labels"], state.get("cluster_sizes")
    problems = []
    integer = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
    if labels.ndim != 1 or not integer:   # (any integer type, as _fill reads it: int64 is all laic has written)
        problems.append(f"labels is {labels.dtype} of shape {tuple(labels.shape)}, not integers [N]")
    elif len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < k):
        problems.append(f"labels run from {int(labels.min())} to {int(labels.max())}, not within the {k} clusters")
    if sizes is not None and not all(checks.is_int(n) and n >= 0 for n in sizes):
        problems.append("cluster_sizes holds other than counts (ints >= 0)")
    return problems


class _Inconsistent(ValueError):
    """A part of a model file that :func:`read` found not to fit the others (its message names the file)."""


def read(cls, path: Union[str, os.PathLike], device: Optional[str] = None):
    """The ``cls`` (LAIC) model written by :func:`write` at ``path``, on ``device`` (default: the CPU)."""
    path = pathlib.Path(path).expanduser()
    state = _load_state(path)
    _check_consistent(state, path, cls._PARAMS)
    params = _params_of(state, device)
    # A subclass's own options are not in the file (its defaults); one that fixes some of LAIC's in its constructor
    # does not take them by name: they are set after it, to what the model was fitted with.
    taken = cls._param_names()
    model = cls(**{name: params[name] for name in taken if name in params})
    _warn_if_the_constructor_differs(cls, model, {name: value for name, value in params.items() if name not in taken})
    for name, value in params.items():
        setattr(model, name, value)
    model.fit_params_ = model.laic_options()
    target = model.torch_device()   # a device that cannot be used is the caller's error, not the file's
    try:
        _fill(model, state, path, target)
    except _Inconsistent:
        raise
    except (KeyError, AttributeError, TypeError, ValueError, IndexError) as exc:   # a part of another shape or type
        raise ValueError(f"{path} is not a consistent LAIC model file ({type(exc).__name__}: {first_line(exc)})"
                         ) from exc
    return model


def _warn_if_the_constructor_differs(cls, model, fitted: dict) -> None:
    """Warn where ``cls``'s constructor set one of LAIC's options that it does not take by name otherwise than the
    file's ``fitted`` values (a subclass deriving it from an option of its own, which the file does not hold): the
    model predicts as fitted, but its ``get_params`` and ``clone`` give the subclass's defaults (a review: silent
    before). The machine's settings (device, n_threads) are the caller's, not the fit's."""
    def same(a, b):
        return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)

    differ = [name for name, value in fitted.items()
              if name not in ("device", "n_threads") and not same(getattr(model, name, None), value)]
    if differ:
        warn_at_caller(f"{cls.__name__}() sets {', '.join(f'{n}={getattr(model, n, None)!r}' for n in differ)} where "
                       f"the file was fitted with {', '.join(f'{n}={fitted[n]!r}' for n in differ)}; the loaded model "
                       f"has the file's and predicts as fitted, but {cls.__name__}'s own options are not in the file, "
                       "so its get_params and clone give its defaults")


def _params_of(state: dict, device) -> dict:
    """The LAIC options of a checked file's ``state``, on ``device``."""
    params = dict(state["params"])
    params["device"] = "cpu" if device is None else device   # (device=0 is CUDA device 0, as in LAIC(device=0))
    # Like the device, the saving machine's: n_threads=16 refused a refit (or a clone's fit) on a 2-CPU machine.
    params["n_threads"] = None
    if "relation_share" not in state:
        # Files of laic versions before relation_fused="auto": those before the switch itself fitted without it.
        params.setdefault("relation_fused", False)
    # Files of laic versions before the switch made their relation features with the nouns weighted alike (the map
    # itself is in the file: this only records how the model was fitted).
    params.setdefault("usage_weighting", False)
    return params


def _fill(model, state: dict, path: pathlib.Path, target: torch.device) -> None:
    """Set the fitted attributes of ``model`` from a checked file's ``state``, on ``target``."""
    params = model.fit_params_
    model.image_mean_ = state["image_mean"].to(target)
    model.text_mean_ = state["text_mean"].to(target)
    model.nouns_ = state["nouns"].to(target)
    model.noun_names_ = list(state["noun_names"])
    model.agreement_ = float(state["agreement"])
    model.n_features_in_ = int(state["n_features_in"])
    names = state.get("feature_names_in")   # absent in files of older laic versions, as in fits without names
    if names is not None:
        if not (isinstance(names, list) and len(names) == model.n_features_in_
                and all(isinstance(n, str) for n in names)):
            raise _Inconsistent(f"{path} is not a consistent LAIC model file: its feature_names_in is not "
                                f"{model.n_features_in_} column names")
        model.feature_names_in_ = np.asarray(names, dtype=object)
    model.centres_ = state["centres"].to(target)
    model.image_floor_ = state.get("image_floor")   # absent in files of older laic versions: no check
    model.fused_centres_ = None if state["fused_centres"] is None else state["fused_centres"].to(target)
    relation_map = state.get("relation_map")   # absent in files of older laic versions (which never used it)
    model.relation_map_ = None if relation_map is None else relation_map.to(target)
    # Absent in files of older laic versions, whose relation_fused was True (all relation features) or False (none).
    model.relation_share_ = float(state.get("relation_share", float(params.get("relation_fused") is True)))
    # Absent in files of older laic versions, which weighted the relation features' nouns alike.
    model.usage_share_ = float(state.get("usage_share", 0.0))
    model.attended_nouns_ = float(state.get("attended_nouns", float("nan")))
    model.labels_ = state["labels"].numpy().astype(np.int64)
    model.cluster_names_ = [list(names) for names in state["cluster_names"]]
    # Absent in files of older laic versions: the sizes of their (whole) labels.
    sizes = state.get("cluster_sizes")
    model.cluster_sizes_ = ([int(n) for n in sizes] if sizes is not None else
                            np.bincount(model.labels_, minlength=len(model.cluster_names_)).tolist())
    # Files from before n_clusters='auto' hold an int n_clusters and no search.
    model.n_clusters_ = int(state.get("n_clusters_", params["n_clusters"]))
    scores = state.get("k_scores")
    model.k_scores_ = None if scores is None else [(int(k), float(s)) for k, s in scores]
    model.history_ = {}
    model.stage1_report_ = dict(state.get("stage1_report") or {})   # absent in files of older laic versions
    model.agreement_report_ = dict(state.get("agreement_report") or {})   # likewise
    model.image_head_ = model.text_head_ = None
    assignment = state.get("assignment")   # absent in files of older laic versions
    model.assignment_ = None if assignment is None else CentreAssignment.from_state(assignment, target)
    # Absent in files of older laic versions (which kept no record of it, as if no refinement had run).
    model.refine_report_ = dict(state.get("refine_report") or {})
    if state["image_head"] is not None:
        try:
            model.image_head_ = _load_head(state["image_head"], model.n_features_in_, model.n_clusters_, target)
            model.text_head_ = _load_head(state["text_head"], model.n_features_in_, model.n_clusters_, target)
        except (KeyError, RuntimeError) as exc:   # load_state_dict's shape mismatch
            raise _Inconsistent(f"{path} is not a consistent LAIC model file: its heads do not fit its "
                                f"{model.n_clusters_} clusters of dimension {model.n_features_in_} ({exc})") from None
    if state.get("stage2"):
        from .stage2 import Stage2Part   # only then: stage 2 pulls in the image pipeline
        model.stage2_ = Stage2Part.from_state(state["stage2"])


def _load_head(state: dict, dim: int, n_clusters: int, device: torch.device) -> ClusterHead:
    return ClusterHead.from_state(state, dim, n_clusters).to(device).eval()
