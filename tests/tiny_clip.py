"""Test helpers: a tiny open_clip model and real images on disk.

``register_tiny_clip()`` adds a small ViT config to open_clip's registry, so that
``open_clip.create_model_and_transforms`` builds it by name with random weights (no download) in well under a second. Its text tower keeps open_clip's vocabulary
(49408) and context length (77), so the bundled tokenizer works unchanged.

``write_cifar_pngs(folder, n)`` writes the first ``n`` of the 500 real CIFAR-10 test images from the shared data folder
as PNG files, so that image decoding is exercised on real pictures. Where the data folder is absent, generated pictures
(smooth colour gradients with a disc, and noise) stand in, so that the image, stage-2 and report tests still run:
none of them scores the pictures' content.
"""
from __future__ import annotations

import copy
import pathlib
from typing import List

import numpy as np

TINY_CLIP_NAME = "laic-tiny-test"

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

CIFAR_IMAGES = pathlib.Path("cifar10-test-first500") / "images_uint8_32x32x3.npy"  # inside laic.runtime.data_dir()


def register_tiny_clip(name: str = TINY_CLIP_NAME, **overrides) -> str:
    """Register the tiny config under ``name`` (idempotent) and return the name. ``overrides`` replace top-level keys
    (e.g. ``embed_dim=16``) so a test can register a second, different model."""
    import open_clip.factory

    config = copy.deepcopy(TINY_CLIP_CONFIG)
    config.update(copy.deepcopy(overrides))
    # open_clip looks names up in this module-level dict (get_model_config); add_model_config would need a JSON file.
    open_clip.factory._MODEL_CONFIGS[name] = config
    return name


N_CIFAR = 500


def cifar_images(n: int = N_CIFAR) -> np.ndarray:
    """The first ``n`` real CIFAR-10 test images, uint8 [n, 32, 32, 3]; generated ones where the data folder lacks
    them (:func:`generated_images`)."""
    from laic.runtime import data_dir

    if not 1 <= n <= N_CIFAR:
        raise ValueError(f"n must be between 1 and {N_CIFAR}, got {n}")
    path = data_dir() / CIFAR_IMAGES
    return np.load(path)[:n] if path.exists() else generated_images(n)


def generated_images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` seeded 32 x 32 RGB pictures, uint8: a colour gradient, a disc of another colour and pixel noise, so
    that no two are alike and PNG coding has edges and texture to keep."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32].astype(np.float64) / 31.0
    base = rng.uniform(0, 255, (n, 1, 1, 3))
    slopes = rng.uniform(-100, 100, (n, 2, 1, 1, 3))
    pictures = base + slopes[:, 0] * x[None, :, :, None] + slopes[:, 1] * y[None, :, :, None]
    centre, radius = rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.1, 0.35, n)
    inside = (x[None] - centre[:, 0, None, None]) ** 2 + (y[None] - centre[:, 1, None, None]) ** 2 < radius[:, None, None] ** 2
    pictures = np.where(inside[..., None], rng.uniform(0, 255, (n, 1, 1, 3)), pictures)
    pictures += rng.normal(0, 12, pictures.shape)
    return np.clip(np.rint(pictures), 0, 255).astype(np.uint8)


def write_cifar_pngs(folder, n: int = 500) -> List[pathlib.Path]:
    """Write the first ``n`` of :func:`cifar_images` (real where the data folder has them, else generated) as
    ``folder/img_0000.png`` ... and return the paths in index order."""
    from PIL import Image

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(cifar_images(n)):
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
