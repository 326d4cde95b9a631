"""Stage 2's images: the tower's preprocessing, the weak and strong augmentations, and the datasets that stream them
from disk. Every image's augmentation in an epoch is seeded by (seed, epoch, image index), so a run gives the same
result whichever DataLoader worker decodes an image and wherever it was interrupted."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..images import DECODE_ERRORS, PathLike, WorkerLoader, open_rgb, start_worker

# How a tower resizes when its config does not say (open_clip's defaults; also what files saved before these keys
# were recorded were trained with).
DEFAULT_RESIZE = {"interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def preprocess_cfg(clip_model: nn.Module) -> dict:
    """The tower's preprocessing as open_clip records it: input size, normalisation, and how images are resized."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(clip_model)
    if not cfg:
        size = getattr(clip_model.visual, "image_size", 224)
        cfg = {"size": size, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    size = cfg["size"]
    return {"size": tuple(size) if isinstance(size, (tuple, list)) else (size, size),
            "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
            **{key: cfg.get(key, default) for key, default in DEFAULT_RESIZE.items()}}


def build_transforms(preprocess_cfg: dict):
    """(eval, weak, strong) transforms at the tower's input size and normalisation. The eval view is open_clip's own
    (the images' stage-0 embeddings were made with it: a tower that squashes images, not crops them, was fine-tuned
    and relabelled on crops before); the augmented views crop at random, with the tower's interpolation."""
    import open_clip
    from torchvision import transforms as T

    resize = {key: preprocess_cfg.get(key, default) for key, default in DEFAULT_RESIZE.items()}
    size, mean, std = preprocess_cfg["size"], preprocess_cfg["mean"], preprocess_cfg["std"]
    eval_tf = open_clip.image_transform(size, is_train=False, mean=mean, std=std, **resize)
    interpolation = (T.InterpolationMode.BILINEAR if resize["interpolation"] == "bilinear"
                     else T.InterpolationMode.BICUBIC)
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    crop_flip = [T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interpolation), T.RandomHorizontalFlip()]
    weak = T.Compose([*crop_flip, *finish])
    strong = T.Compose([*crop_flip,
                        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                        T.RandomGrayscale(p=0.2),
                        T.RandomApply([_RandomBlur(0.1, 2.0)], p=0.5),
                        *finish])
    return eval_tf, weak, strong


class _RandomBlur:
    """Gaussian blur of a PIL image with sigma drawn uniformly in [low, high] pixels from torch's RNG (so the
    per-image seeding covers it). PIL's blur is used because torchvision's is ~100x slower on PIL images."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, img):
        from PIL import ImageFilter

        sigma = float(torch.empty(1).uniform_(self.low, self.high))
        return img.filter(ImageFilter.GaussianBlur(sigma))


def readable(path: PathLike):
    """``open_rgb(path)``, or a ValueError naming the image and the fix (stage 2 needs every image it was given)."""
    from PIL import Image

    try:
        return open_rgb(path)
    except DECODE_ERRORS + (Image.DecompressionBombError,) as exc:   # (as every other reader of images)
        # (Removing or replacing the file, as this said before, makes a checkpoint refuse to resume: its images differ.)
        raise ValueError(f"cannot read image {path} ({exc}); stage 2 reads every image it was given: fit again "
                         "without it, or, if it changed since the fit began, put the file back as it was (its "
                         "modification time too: cp -p) and resume"
                         ) from None


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one image's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's shuffling (and of the DataLoader workers' base seed)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class TwoViews(torch.utils.data.Dataset):
    """(image index, pseudo-label, weak view, strong view); each item's augmentation is seeded by (seed, epoch,
    index), so it is the same whichever worker decodes it and whether or not the run was resumed."""

    def __init__(self, paths, indices: np.ndarray, labels: np.ndarray, weak, strong, seed: int, epoch: int):
        self.paths, self.indices, self.labels = paths, indices, labels
        self.weak, self.strong, self.seed, self.epoch = weak, strong, seed, epoch

    def __len__(self):
        return len(self.indices)

    def path_of(self, j):
        """The file item ``j`` reads (what laic.images.WorkerLoader names when a worker dies reading it)."""
        return self.paths[int(self.indices[j])]

    def __getitem__(self, j):
        index = int(self.indices[j])
        img = readable(self.paths[index])   # one given with its feature row, or damaged since it was embedded
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (torchvision draws from it): torch.manual_seed would reseed every GPU's stream
            # too, which fork_rng(devices=[]) does not restore (the caller's CUDA streams were left reseeded).
            torch.default_generator.manual_seed(item_seed(self.seed, self.epoch, index))
            weak, strong = self.weak(img), self.strong(img)
        return index, int(self.labels[j]), weak, strong


def next_batch(batches):
    """``next(batches)`` of a DataLoader; a bad image a worker process met (:func:`readable`'s ValueError) raised as
    its own one line: torch re-raises it as "Caught ValueError in DataLoader worker process 0" followed by the
    worker's whole traceback."""
    try:
        return next(batches)
    except ValueError as exc:
        lines = str(exc).rstrip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught ValueError in DataLoader worker"):
            raise ValueError(lines[-1].removeprefix("ValueError: ")) from None
        raise


def collate_or_none(items):
    """The default collation, or None for an empty batch (a rank's empty share of a last batch)."""
    return torch.utils.data.default_collate(items) if items else None


def batch_loader(dataset, batches, num_workers: int, device: torch.device, generator: torch.Generator):
    """A DataLoader over ``batches`` (lists of dataset positions, see laic.stage2.parallel.EpochBatches). The
    generator only seeds the workers' base seed, which would otherwise be drawn from the global RNG."""
    return WorkerLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_or_none,
                        pin_memory=device.type == "cuda", generator=generator, persistent_workers=False,
                        worker_init_fn=start_worker)
