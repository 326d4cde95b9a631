"""A generated "semantic" dataset for `laic demo`: CLIP-like image and noun embeddings with known labels, no downloads.

What it models, and why LAIC should beat k-means on it (the premise of language-assisted clustering):
- Concepts (the ground-truth classes) come in groups (animals, vehicles, food, ...). A concept's direction mixes its
  group's direction with its own, so concepts of one group are confusable (cat vs dog), as in real CLIP space.
- Nouns are points near their meaning: each concept's own noun, a few close relatives (kitten near cat), and many
  distractor nouns from groups no image shows (furniture, instruments, ...). Every noun has a readable name.
  A concept's images come in sub-kinds, one per noun of the concept (cats, kittens, tabbies): fine structure that
  the image space and the nouns share, as in real CLIP space.
- Images are their concept's direction plus *nuisance* variation that language does not carry: a style (photo, sketch,
  painting, ...) and a background, each a strong direction orthogonal to the semantic subspace, plus isotropic noise.
  Some images also blend in a second concept of their group. Image-space k-means partly splits by style or background;
  an image's nearest nouns ignore both, which is what the text side of LAIC exploits.
- Like CLIP, images and nouns sit in two cones apart (the "modality gap"): a shared offset is added to every image, so
  image-noun cosines are low (about 0.2 to 0.35) while image-image cosines are high.

Everything is drawn from one seeded generator: the same arguments give the same arrays on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

# The concepts by group; each lists a few close relatives (nouns that lie near it). The classes are the first
# ``n_classes`` concepts taken round-robin over the groups (``_concepts``); the concepts not drawn stay nouns near
# their group's direction, and the distractors are ``DISTRACTOR_GROUPS``' words.
CONCEPT_GROUPS: Dict[str, List[Tuple[str, List[str]]]] = {
    "animal": [("cat", ["kitten", "tabby"]), ("dog", ["puppy", "terrier"]), ("horse", ["pony", "stallion"]),
               ("bird", ["sparrow", "parrot"]), ("cow", ["calf", "bull"]), ("sheep", ["lamb", "ram"])],
    "vehicle": [("car", ["sedan", "taxi"]), ("truck", ["lorry", "pickup truck"]), ("bicycle", ["bike", "tandem"]),
                ("airplane", ["jet", "airliner"]), ("ship", ["boat", "ferry"]), ("train", ["locomotive", "tram"])],
    "food": [("pizza", ["flatbread", "calzone"]), ("apple", ["pear", "quince"]), ("cake", ["cupcake", "pie"]),
             ("banana", ["plantain", "mango"]), ("sandwich", ["burger", "wrap"]), ("carrot", ["parsnip", "radish"])],
    "plant": [("flower", ["rose", "tulip"]), ("tree", ["oak", "pine"]), ("cactus", ["succulent", "aloe"]),
              ("mushroom", ["toadstool", "truffle"]), ("fern", ["moss", "bracken"]), ("grass", ["lawn", "reed"])],
}

# Groups that no image shows: their nouns only distract.
DISTRACTOR_GROUPS: Dict[str, List[str]] = {
    "furniture": ["chair", "table", "sofa", "bed", "wardrobe", "bookshelf", "stool", "desk", "bench", "cabinet"],
    "instrument": ["guitar", "piano", "violin", "drum", "flute", "trumpet", "harp", "cello", "banjo", "saxophone"],
    "tool": ["hammer", "screwdriver", "wrench", "saw", "drill", "pliers", "chisel", "shovel", "rake", "axe"],
    "clothing": ["shirt", "jacket", "hat", "shoe", "scarf", "glove", "sock", "dress", "coat", "belt"],
    "building": ["house", "tower", "bridge", "castle", "church", "barn", "skyscraper", "cabin", "temple", "lighthouse"],
    "electronics": ["laptop", "phone", "television", "camera", "keyboard", "monitor", "radio", "speaker", "tablet",
                    "printer"],
    "kitchenware": ["cup", "plate", "bowl", "fork", "spoon", "knife", "kettle", "pan", "jar", "bottle"],
    "landscape": ["mountain", "river", "beach", "desert", "forest", "lake", "valley", "island", "glacier", "canyon"],
    "sport": ["ball", "racket", "helmet", "skateboard", "surfboard", "ski", "kite", "frisbee", "bat", "glove box"],
}

STYLES = ("photo", "sketch", "painting", "cartoon")
BACKGROUNDS = ("indoor", "street", "field", "studio")


@dataclass
class DemoData:
    """Image features ``[N, D]`` with ``labels`` ``[N]`` (ids into ``class_names``), noun features ``[M, D]`` with
    ``noun_names``; ``styles`` / ``backgrounds`` ``[N]`` are the nuisance factors each image was drawn with."""

    features: np.ndarray
    labels: np.ndarray
    class_names: List[str]
    noun_features: np.ndarray
    noun_names: List[str]
    styles: np.ndarray
    backgrounds: np.ndarray


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _orthonormal(rng: np.random.Generator, dim: int, count: int) -> np.ndarray:
    """``count`` orthonormal rows in ``dim`` dimensions (count <= dim)."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, count)))
    return q.T


def _concepts(n_classes: int) -> List[Tuple[str, str, List[str]]]:
    """The first ``n_classes`` concepts, taken round-robin over the groups so every group contributes confusable
    pairs; each as (group, name, relatives)."""
    per_group = list(CONCEPT_GROUPS.items())
    out = []
    for rank in range(max(len(v) for _, v in per_group)):
        for group, members in per_group:
            if rank < len(members) and len(out) < n_classes:
                out.append((group, members[rank][0], members[rank][1]))
    return out


def max_classes() -> int:
    return sum(len(v) for v in CONCEPT_GROUPS.values())


def make_semantic_dataset(n_classes: int = 10, n_per_class: int = 100, dim: int = 128, *, seed: int = 0,
                          nuisance: float = 0.65, noise: float = 1.5, blend_fraction: float = 0.15,
                          imbalance: float = 0.5, sibling_closeness: float = 0.75,
                          subconcept_closeness: float = 0.7) -> DemoData:
    """Generate the demo dataset (see the module docstring).

    Args:
        n_classes: number of ground-truth concepts K (2 .. ``max_classes()``).
        n_per_class: images of the largest class; others shrink linearly down to ``(1 - imbalance)`` of it.
        dim: embedding dimension D (>= 32: the semantic, nuisance and gap directions must fit).
        nuisance: length of the style and background directions, relative to the concept direction (length 1).
        noise: total length of the isotropic noise added to each image.
        blend_fraction: share of images that blend in a second concept of their group (weight 0.35).
        imbalance: 0 gives equal classes.
        seed: the generator's seed (the same seed, the same data set).
        sibling_closeness: about the cosine between a concept's direction and its group's (cat and dog).
        subconcept_closeness: about the cosine between a concept's direction and each of its nouns' sub-kinds
            (cat and kitten).
    """
    if not 2 <= n_classes <= max_classes():
        raise ValueError(f"n_classes must be between 2 and {max_classes()}, got {n_classes}")
    if n_per_class < 2:
        raise ValueError(f"n_per_class must be at least 2, got {n_per_class}")
    if dim < 32:
        raise ValueError(f"dim must be at least 32, got {dim}")
    if not 0 <= imbalance < 1:
        raise ValueError(f"imbalance must be in [0, 1), got {imbalance}")
    rng = np.random.default_rng(seed)
    concepts = _concepts(n_classes)
    all_groups = list(CONCEPT_GROUPS) + list(DISTRACTOR_GROUPS)

    # Split the space: semantic directions (groups and their words) live in one subspace; nuisance directions and
    # the modality-gap offset in its orthogonal complement, so no noun "sees" style, background or the gap.
    n_nuisance = len(STYLES) + len(BACKGROUNDS) + 1
    basis = _orthonormal(rng, dim, dim)
    semantic_basis, nuisance_basis = basis[: dim - n_nuisance], basis[dim - n_nuisance:]

    def semantic_direction() -> np.ndarray:
        return _unit(rng.standard_normal(dim - n_nuisance) @ semantic_basis)

    group_dir = {g: semantic_direction() for g in all_groups}
    style_dir = nuisance_basis[: len(STYLES)]
    background_dir = nuisance_basis[len(STYLES): len(STYLES) + len(BACKGROUNDS)]
    gap = nuisance_basis[-1]

    def word_near(anchor: np.ndarray, closeness: float) -> np.ndarray:
        # cos(word, anchor) is about `closeness` in high dimension.
        return _unit(closeness * anchor + np.sqrt(1 - closeness**2) * semantic_direction())

    # Concepts of one group share part of their direction: cos about sibling_closeness**2 between siblings.
    concept_dir = np.stack([word_near(group_dir[g], sibling_closeness) for g, _, _ in concepts])

    # Each concept's images come in sub-kinds, one per noun of the concept (cat, kitten, tabby): a structure the
    # image space and the nouns share, as real photos of kittens sit nearer "kitten" than "cat".
    sub_dirs = [np.stack([direction] + [word_near(direction, subconcept_closeness) for _ in relatives])
                for (_, _, relatives), direction in zip(concepts, concept_dir)]
    names, vectors = [], []
    for (group, name, relatives), meanings in zip(concepts, sub_dirs):
        for word, meaning in zip([name] + relatives, meanings):
            names.append(word)
            vectors.append(word_near(meaning, 0.95))
    used = set(names)
    for group, members in CONCEPT_GROUPS.items():  # concepts not drawn as classes still exist as nouns
        for name, _ in members:
            if name not in used:
                names.append(name)
                vectors.append(word_near(group_dir[group], 0.67))
    for group, words in DISTRACTOR_GROUPS.items():
        for name in words:
            if name not in used:
                names.append(name)
                vectors.append(word_near(group_dir[group], 0.6))
                used.add(name)
    order = rng.permutation(len(names))  # no hint of the classes in the noun order
    noun_names = [names[i] for i in order]
    noun_features = np.stack(vectors)[order]

    sizes = np.round(n_per_class * (1 - imbalance * np.arange(n_classes) / max(n_classes - 1, 1))).astype(int)
    labels = np.repeat(np.arange(n_classes), np.maximum(sizes, 2))
    n = labels.size
    styles = rng.integers(len(STYLES), size=n)
    backgrounds = rng.integers(len(BACKGROUNDS), size=n)

    sub_kind = rng.integers(len(sub_dirs[0]), size=n)
    x = np.stack([sub_dirs[label][kind] for label, kind in zip(labels, sub_kind)])
    siblings = [np.flatnonzero([c[0] == concepts[k][0] and j != k for j, c in enumerate(concepts)])
                for k in range(n_classes)]
    blend = rng.random(n) < blend_fraction
    for i in np.flatnonzero(blend):
        if siblings[labels[i]].size:
            x[i] = 0.65 * x[i] + 0.35 * concept_dir[rng.choice(siblings[labels[i]])]
    x += nuisance * (style_dir[styles] + background_dir[backgrounds])
    x += noise * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x = _unit(x)
    # The modality gap: a shared offset (after normalising, so it dominates image-image similarity the way it does
    # in CLIP), then normalise again.
    x = _unit(x + 1.2 * gap)

    perm = rng.permutation(n)  # shuffled, so the row order carries no label
    return DemoData(features=x[perm].astype(np.float32), labels=labels[perm].astype(np.int64),
                    class_names=[c[1] for c in concepts], noun_features=noun_features.astype(np.float32),
                    noun_names=noun_names, styles=styles[perm], backgrounds=backgrounds[perm])
