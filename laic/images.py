"""Image files: discovery in a folder, and parallel decoding that skips unreadable files instead of crashing.

Used by laic.embed (encoding a folder) and by stage 2 (fine-tuning on the same images).
"""
from __future__ import annotations

import os
import pathlib
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

PathLike = Union[str, os.PathLike]

# What PIL reads without plugins; matched case-insensitively (.jfif: JPEGs as browsers save them).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"})


def list_images(folder: PathLike) -> List[pathlib.Path]:
    """All image files under ``folder`` (recursive, following symlinks, common extensions, hidden files and folders
    left out), as absolute paths sorted by their path relative to ``folder``, so the order is the same on every
    machine."""
    root = pathlib.Path(folder).expanduser()
    if not root.exists():
        raise ValueError(f"image folder {str(root)!r} does not exist; pass the folder that holds your images")
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} is not a folder; pass the folder that holds your images")
    root = pathlib.Path(os.path.abspath(root))  # absolute, symlinks kept: paths come back as the user knows them
    found, visited, unreadable = [], set(), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable.append):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop, or a folder linked twice: read each folder once
            dirnames[:] = []
            continue
        visited.add(real)
        # Hidden folders hold caches and tool metadata (.git, our own .features.shards), never the user's images;
        # nor does a file system's lost+found (root's alone: a disk's top folder would be refused as unreadable).
        # Sorted: os.walk descends in this order, so a folder linked twice is always listed under the same name.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "lost+found")
        for name in filenames:
            path = pathlib.Path(dirpath, name)
            # A link to nothing is not an image: left out, like other files (os.path.isfile follows links).
            if (not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                    and os.path.isfile(path)):
                found.append(path)
    if unreadable:   # its images would be left out without a word
        raise ValueError(f"image folder {str(root)!r}: cannot read {len(unreadable)} folder(s) in it, e.g. "
                         f"{unreadable[0].filename!r} ({unreadable[0].strerror or unreadable[0]}); make them readable, "
                         "or move them out of it")
    # laic's file lists (images.txt, files.txt) hold one path a line: a name with a line break would be two.
    broken = [p for p in found if "\n" in str(p) or "\r" in str(p)]
    if broken:
        warnings.warn(f"left out {len(broken)} image(s) whose names hold a line break (laic lists files one a "
                      f"line); rename them to include them: {', '.join(repr(str(p)) for p in broken[:3])}",
                      stacklevel=2)
        found = [p for p in found if p not in broken]
    if not found:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"image folder {str(root)!r} holds no image files (looked for {kinds}, recursively); "
                         f"point it at the folder that holds your images")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def files_digest(paths: Sequence[PathLike]) -> str:
    """The files by name, size and modification time (a missing one as missing): a file rewritten under its name
    changes it. Identifies the images an embedding cache or a stage-2 checkpoint was made from."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        # os.fsencode: a file name that is not UTF-8 is hashed as its bytes (str.encode would refuse it).
        try:
            st = os.stat(p)
            h.update(os.fsencode(p) + f"\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(os.fsencode(p) + b"\tmissing\n")
    return h.hexdigest()


# What a broken, truncated or non-image file raises while PIL decodes it. A programming error (TypeError, ...) is not
# in this list on purpose: it must surface, not turn every image into a "skipped" one.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def open_rgb(path: PathLike):
    """Decode ``path`` fully (not lazily, so truncation is found here) into an RGB PIL image, turned upright by its
    EXIF orientation (a phone photo stored sideways is shown upright by every viewer: so it is embedded and drawn)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        return _eight_bit(ImageOps.exif_transpose(image)).convert("RGB")


def _eight_bit(image):
    """16-bit and 32-bit greyscale (PIL modes I;16*, I, F) in 8 bits: convert("RGB") would clip them to white.
    16-bit values are scaled by their range (65535 -> 255); 32-bit ones, which have no fixed range, by the image's."""
    import numpy as np
    from PIL import Image

    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))


class ImageDataset(Dataset):
    """``dataset[i]`` is ``(transform(image_i), i)``, or ``(None, i)`` when file i cannot be decoded; pair it with
    :func:`collate_readable`, which drops the unreadable items from the batch and reports their indices."""

    def __init__(self, paths: Sequence[PathLike], transform: Callable):
        self.paths = [pathlib.Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], int]:
        from PIL import Image

        try:
            image = open_rgb(self.paths[index])
            return self.transform(image), index
        except DECODE_ERRORS + (Image.DecompressionBombError,):
            return None, index


def collate_readable(items) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[int]]:
    """``(images [B', C, H, W] or None when none was readable, indices [B'] of those images, unreadable indices)``."""
    good = [(x, i) for x, i in items if x is not None]
    bad = [i for x, i in items if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    indices = torch.tensor([i for _, i in good], dtype=torch.long)
    return images, indices, bad


def make_loader(dataset: ImageDataset, *, num_workers: int = 2, pin_memory: bool = False,
                **loader_kwargs) -> DataLoader:
    """A DataLoader that decodes in ``num_workers`` processes and skips unreadable files (see collate_readable).
    Without a sampler in ``loader_kwargs`` it keeps dataset order (shuffle=False), so results line up with paths.
    A generator of its own: a DataLoader draws its workers' base seed from torch's global stream otherwise (with
    no workers too), and laic leaves the caller's stream alone."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0 (0 decodes in the main process), got {num_workers!r}")
    loader_kwargs.setdefault("generator", torch.Generator())
    return DataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_readable,
                      **loader_kwargs)
