"""Stage 2 timing: one fine-tuning epoch (images/s, peak memory) and where the time goes (torch.profiler top ops).

    python benchmarks/stage2.py                                  # ViT-B-32 at 224 px, random weights, on the GPU
    python benchmarks/stage2.py --tiny --n-images 64 --device cpu  # the tests' tiny ViT at 32 px: a quick CPU check

Images are synthetic JPEGs written to a temporary folder, so decoding from disk is part of the measurement, as in a
real run; weights are random (timing does not depend on them). The stage-1 model is a stand-in with random centres.
The epoch time excludes the relabelling pass; the setup and the final relabelling are timed together (a lower
bound of the relabelling's images/s).
"""
from __future__ import annotations

import argparse
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import machine_name  # noqa: E402

from laic import stage2  # noqa: E402
from laic.stage2.data import preprocess_cfg  # noqa: E402


class RandomCentres:
    """Stage-1 stand-in: softmax over cosine similarity to K random unit centres."""

    def __init__(self, dim: int, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)

    def predict_proba(self, features):
        f = F.normalize(torch.as_tensor(np.asarray(features)).float(), dim=1)
        return (f @ self.centres.t() / 0.05).softmax(1).numpy()


def write_images(folder: pathlib.Path, n: int, size: int, seed: int = 0):
    """``n`` smooth random colour JPEGs of ``size`` px (decoding cost like a photo's, unlike pure noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        path = folder / f"img_{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def build_model(args):
    import open_clip

    name = args.model
    if args.tiny:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny_clip import register_tiny_clip

        name = register_tiny_clip()
    torch.manual_seed(0)
    return name, open_clip.create_model(name, pretrained=None).eval()


def peak_memory_mb(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB (CUDA, max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (process peak RSS)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights)")
    parser.add_argument("--tiny", action="store_true", help="use the tests' tiny ViT (32 px) instead of --model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-images", type=int, default=None, help="images per epoch before selection "
                        "(default 4096 on CUDA, 64 on CPU)")
    parser.add_argument("--image-px", type=int, default=None, help="side of the JPEGs on disk (default: model size "
                        "+ 1/7, like photos resized for CLIP)")
    parser.add_argument("--k", type=int, default=10, help="clusters")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    parser.add_argument("--n-blocks", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None, help="decoding processes (default min(8, cores))")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--profile-batches", type=int, default=4, help="batches under torch.profiler (0: none)")
    parser.add_argument("--top", type=int, default=15, help="operators listed by the profiler")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n_images = args.n_images or (4096 if cuda else 64)
    batch = args.batch_size or (256 if cuda else 16)
    import os

    workers = args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)
    name, model = build_model(args)
    size = preprocess_cfg(model)["size"][0]
    px = args.image_px or size + size // 7
    # keep_fraction=1: every image trains, so "images per epoch" is n_images.
    config = stage2.Stage2Config(epochs=1, batch_size=batch, n_blocks=args.n_blocks, lora_rank=args.lora_rank,
                                 keep_fraction=1.0, amp=not args.no_amp, num_workers=workers, eval_batch_size=batch)
    dim = model.visual.output_dim
    stage1 = RandomCentres(dim, args.k)
    features = F.normalize(torch.randn(n_images, dim, generator=torch.Generator().manual_seed(1)), dim=1).numpy()

    print(f"# stage 2 on {machine_name(device)}")
    print(f"model {name} ({size} px, random weights), n_blocks={args.n_blocks}, lora_rank={args.lora_rank}, "
          f"K={args.k}, batch {batch} x 2 views, {workers} decoding workers, "
          f"AMP {'on' if cuda and config.amp else 'off'}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = write_images(pathlib.Path(tmp), n_images, px)
        print(f"wrote {n_images} JPEGs of {px} px in {time.perf_counter() - t:.1f} s")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = stage2.fine_tune(stage1, model, paths, image_features=features, config=config, device=device)
        total = time.perf_counter() - start
        epoch = result.history[0]
        relabel = total - epoch["seconds"]
        # Setup and the final relabelling are not timed apart: their images/s is a lower bound of the relabelling's.
        print("| images | epoch s | images/s (train, 2 views each) | setup + final relabel s | "
              "images/s (setup + relabel, at least the relabel's) | peak memory |")
        print("|---|---|---|---|---|---|")
        print(f"| {epoch['images']} | {epoch['seconds']:.2f} | {epoch['images_per_s']:.1f} | {relabel:.2f} | "
              f"{n_images / relabel:.1f} | {peak_memory_mb(device)} |")

        if args.profile_batches > 0:
            profile(stage1, model, paths[:batch * args.profile_batches], features[:batch * args.profile_batches],
                    config, device, args.top)


def profile(stage1, model, paths, features, config, device, top):
    """Run one short epoch under torch.profiler and print the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        stage2.fine_tune(stage1, model, paths, image_features=features, config=config, device=device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\ntorch.profiler, {len(paths)} images (one epoch + relabelling), top {top} by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=top))


if __name__ == "__main__":
    main()
