"""`laic fit --images`: stages 0 to 2 on a folder of images (see `laic fit --help`)."""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from typing import Dict, NamedTuple

from .. import io
from .common import (arguments_named_as_flags, describe_options, fit_settings, new_model, parse_options, publish_fit,
                     recorded_path, threads_for_the_run)
from .k_search import cli_k_options, k_search_record, print_k_choice


class _Inputs(NamedTuple):
    vocab: object
    options: Dict
    out: pathlib.Path
    device: str
    config: object
    images: list
    n_clusters: object
    k_range: object
    clip: tuple
    encoder: Dict
    dim: int


def _read_inputs(args: argparse.Namespace, world) -> _Inputs:
    """Every input of ``run_images`` read and checked, on one process (the caller makes it collective)."""
    from .. import stage2
    from ..clip import check_model_name, clip_record, load_clip
    from ..embed_cache import check_same_encoder
    from ..images import list_images
    from ..run_dir import lies_inside
    from ..vocab import read_embedded_vocabulary

    if args.features is not None:
        raise ValueError("--features and --images are alternatives (--images embeds the images itself); pass one")
    if not args.model or not args.pretrained:
        raise ValueError("--images needs --model NAME and --pretrained PATH|TAG: the open_clip encoder --vocab was "
                         "encoded with, which is fine-tuned ('random' for random weights, testing only)")
    check_model_name(args.model, "--model")   # (this step is collective already: its caller's)
    vocab = read_embedded_vocabulary(args.vocab)
    options, out, device = fit_settings(args)
    config = stage2.Stage2Config(seed=args.seed, **parse_options(
        args.stage2_options, stage2.Stage2Config, flag="--stage2", reserved={"seed": "--seed"},
        check=lambda option: stage2.Stage2Config(**option).validate()))
    try:
        config.validate()   # the options together (each alone passed above: e.g. lora_alpha without lora_rank)
    except ValueError as exc:
        raise ValueError(f"--stage2 (the settings together): {exc}") from None
    if world.size > 1 and args.embed_cache is None:
        raise ValueError(f"under torchrun ({world.size} processes) --images needs --embed-cache DIR: each process "
                         "embeds its share of the images into that cache")
    if lies_inside(out, pathlib.Path(args.images).expanduser()):
        raise ValueError(f"--out {args.out}: lies inside --images {args.images}; the run's files (its report's PNGs) "
                         "would be read as images by a later fit or predict on that folder; choose a RUN_DIR "
                         "outside it")
    images = list_images(args.images, "--images")
    n_clusters, k_range = cli_k_options(args.k, args.k_range, len(images))
    clip = load_clip(args.model, args.pretrained, device, seed=args.seed)
    try:   # before the images are embedded and stages 0 and 1 run
        stage2.check_tower(clip[0].visual, config.n_blocks, config.lora_rank)
    except ValueError as exc:
        raise ValueError(f"--stage2 with --model {args.model}: {exc}") from None
    encoder = clip_record(clip, args.model, args.pretrained, args.seed)
    check_same_encoder(encoder, vocab.sidecar, "--model/--pretrained")
    dim = clip[0].visual.output_dim
    if vocab.embeddings.shape[1] != dim:
        raise ValueError(f"--model {args.model} embeds in dimension {dim} but --vocab has "
                         f"{vocab.embeddings.shape[1]}; encode the vocabulary with the same model")
    return _Inputs(vocab, options, out, device, config, images, n_clusters, k_range, clip, encoder, dim)


def run_images(args: argparse.Namespace) -> int:
    """Under torchrun (a process group) every process runs this: they fit together (laic.stage2.fit_images) and
    process 0 alone prints and writes RUN_DIR."""
    from ..distributed import CollectiveError, current, from_main, stop_all_on_failure
    from ..run_dir import checkpoint_dir
    from ..stage2 import CHECKPOINT_NAME

    world = current()
    # On every process, and a bad input on one of them stops all of them, with one message (as `laic fit
    # --features`; each process raised its own error before, and one failing alone left the others to a timeout).
    inputs = stop_all_on_failure(world.group, lambda: _read_inputs(args, world), "reading the inputs")
    checkpoint = checkpoint_dir(inputs.out)
    # Process 0 holds the checkpoint folder for the whole run: a second fit into the same RUN_DIR was told that the
    # running one's checkpoint was an interrupted run, and with --resume both wrote it.
    lock = io.FolderLock(checkpoint, f"another process is fitting into --out {args.out} now (it holds {checkpoint}); "
                                     "wait for it to end, or choose another RUN_DIR")
    interrupted = from_main(world.group, lambda: lock.take() and (checkpoint / CHECKPOINT_NAME).is_file(),
                            "looking for a stage-2 checkpoint")
    try:
        if interrupted and not args.resume:
            raise CollectiveError(f"{checkpoint} holds an interrupted stage-2 run; pass --resume to continue it, or "
                                  "delete that folder to start over")
        if args.resume and not interrupted and world.is_main():
            # Said before the run, not as a note after it (a mistyped --out resumed nothing, and said so at the end).
            print(f"laic fit: --resume, but no stage-2 checkpoint in {checkpoint}: starting from the beginning")
        return _fit_and_publish(args, world, inputs, checkpoint, resume=interrupted)
    finally:
        lock.release()


def _fit_and_publish(args: argparse.Namespace, world, inputs: _Inputs, checkpoint: pathlib.Path, resume: bool) -> int:
    from .. import stage2
    from ..distributed import from_main
    from ..runtime import torch_threads

    vocab, options, out, device, config, images, n_clusters, k_range, clip, encoder, dim = inputs
    if world.is_main():
        processes = f", {world.size} processes" if world.size > 1 else ""
        # Files: those that cannot be read are skipped later, with a warning naming them, and the run holds the rest.
        print(f"laic fit: {len(images)} image files in {args.images}, {len(vocab)} nouns, D = {dim}, K = {args.k}, "
              f"device {device}{processes}; stage 2: {config.epochs} epoch{'s' if config.epochs != 1 else ''}"
              f"{describe_options(options)}")
    start = time.perf_counter()
    # --profile records the whole run, stages 0 to 2, on every process (laic.stage2.fit_images); process 0 writes it.
    model = new_model(args, n_clusters, k_range, device, options)
    threads = threads_for_the_run(args.threads)
    with torch_threads(threads, "--threads"), arguments_named_as_flags(args, f"--images {args.images}"):
        # Each epoch's line is stage 2's progress log (laic.stage2.train), shown with the steps' (laic.cli).
        result = stage2.fit_laic_images(model, args.images, vocab.embeddings, vocab.names, model_name=args.model,
                                        clip=clip, pretrained=args.pretrained, stage2_config=config,
                                        checkpoint_dir=checkpoint, resume=resume, embed_cache=args.embed_cache)
    if not world.is_main():
        from_main(world.group, lambda: None, "writing the run")   # wait for process 0's run (or its error)
        return 0
    args.k = print_k_choice(model)
    seconds = time.perf_counter() - start
    for note in result.notes:
        print(f"note: {note}")
    kept = set(result.paths)
    # Every skipped file named (the warning shows a few; a user found the rest by comparing images.txt by hand).
    skipped = [io.path_text(p) for p in images if str(p) not in kept]
    run_info = {"images": recorded_path(args.images), "vocab": recorded_path(args.vocab), "k": args.k,
                "seed": args.seed,
                "device": device, "threads": threads, "options": options, "n_images": len(result.paths),
                "n_skipped": len(skipped), "skipped": skipped, "n_nouns": len(vocab), "dim": dim,
                "fit_seconds": round(seconds, 3), "encoder": encoder, "stage2": dataclasses.asdict(config),
                "stage2_history": result.history, "stage2_notes": result.notes,
                **k_search_record(model, k_range, len(result.paths))}

    def finished():
        # The run is complete: nothing left to resume. Renamed away first: a stop during the deletion left a
        # checkpoint that the next fit called an interrupted stage-2 run.
        if checkpoint.exists():
            io.delete_folder(checkpoint, checkpoint)

    def published():
        args.published = True   # for fit.interrupted()
        finished()   # before an earlier run is deleted (a stop there left the checkpoint beside the new run)

    # A run kept beside a RUN_DIR that changed meanwhile is complete too: its checkpoint stayed, and the next fit
    # called it an interrupted stage-2 run (a QA helper, 12-08).
    return publish_fit(args, world, model, out, seconds, run_info, published, result.features, result.paths,
                       kept_aside=finished)
