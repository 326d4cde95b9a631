"""Stage 2's per-epoch checkpoint: everything that makes a resumed run end in the same state as an uninterrupted one
(trainable parameters, optimiser, scheduler, gradient scaler, RNG states, pseudo-labels, history, epoch). It replaces
the previous one atomically after every epoch, and is refused for other settings, another base encoder or other
images.

In a process group rank 0 writes it and reads it (handing it to the other ranks). It holds nothing that depends on
the number of processes (``batch_size`` is the combined batch of all ranks; the unwrapped model's parameter names;
one optimiser state, the same on every rank), so a run resumes on any world size. The RNG states are rank 0's and are
restored on every rank; stage 2's results do not draw from the global RNGs (shuffles and augmentations have their
own seeds), so they only make a resumed run's later use of those RNGs continue where the interrupted run stopped."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Dict, List, Optional, Sequence

import torch

from .. import io
from ..clip import module_change
from ..images import PathLike
from ..runtime import first_line
from .config import RESUMABLE_CHANGES, Stage2Config

CHECKPOINT_NAME = "stage2_checkpoint.pt"
CHECKPOINT_FORMAT = "laic-stage2-checkpoint"
# 2: the base encoder is identified by laic.clip.weights_digest of the whole open_clip model.
FORMAT_VERSION = 2


def rng_state(device: torch.device) -> dict:
    """torch's streams (stage 2 draws from no other): the CPU's, and the training GPU's (this process's only: a list
    over every visible GPU would tie the file to the machine's GPU count)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """torch's streams as :func:`rng_state` kept them; fine_tune calls it inside a stream of its own (files written
    before also hold Python's and numpy's streams: stage 2 draws from neither, and restoring them set the caller's)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # written before the state was per GPU: one per visible GPU
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def paths_digest(paths: Sequence[PathLike]) -> str:
    """The image list by name (alike on every rank, whatever its disk): the names' bytes, whatever the locale (the
    same digest as their UTF-8 text under a UTF-8 locale)."""
    return hashlib.sha1(b"\n".join(os.fsencode(p) for p in paths)).hexdigest()


def _start_over(path: pathlib.Path) -> str:
    # Not "run without --resume": `laic fit` refuses to start over beside a checkpoint, which it would replace.
    return (f"resume with the same inputs, or start over: delete {path.parent} (in Python, resume=False starts over "
            "and replaces it)")


def _options_changed(saved: Optional[Dict[str, str]], now: Optional[Dict[str, str]]) -> str:
    """What a refusal says of stage 1's inputs: the options that differ, then and now, where both are known."""
    if not saved or not now:   # a checkpoint of a laic version that kept only the digest, or a caller without them
        return ("another vocabulary or other LAIC options (or by a laic version whose defaults differ, "
                "e.g. min_cluster_size)")
    changed = [f"{name}={saved.get(name, '(none)')} then, {now.get(name, '(none)')} now"
               for name in sorted(set(saved) | set(now)) if saved.get(name) != now.get(name)]
    if not changed:
        return "another vocabulary (the LAIC options are the same)"
    return ("other LAIC options (" + "; ".join(changed) + "; a laic version's own defaults count too), perhaps "
            "also for another vocabulary")


def load_checkpoint(path: pathlib.Path, cfg: Stage2Config, base_fingerprint: str, paths: Sequence[PathLike],
                    files: str, inputs_digest: str = "", inputs_options: Optional[Dict[str, str]] = None,
                    base_modules: Optional[List[str]] = None) -> dict:
    """The checkpoint at ``path``, refused (ValueError saying what differs) unless it was written for the same
    settings, base encoder, images (names, and ``files``: ``laic.images.files_digest`` of them) and
    ``inputs_digest`` (the caller's stage-1 inputs: vocabulary and LAIC options, ``laic.stage2.estimator``);
    checkpoints written before a field existed are not checked on it."""
    ckpt = _read_checkpoint(path)
    _check_settings(ckpt, path, cfg, base_fingerprint, inputs_digest, inputs_options, base_modules)
    if ckpt["paths_digest"] != paths_digest(paths):
        raise ValueError(f"checkpoint {path} was written for another list of images; {_start_over(path)}")
    if ckpt.get("files_digest", files) != files:
        raise ValueError(f"checkpoint {path} was written before some images changed (their sizes or modification "
                         f"times differ); {_start_over(path)}")
    return ckpt


def check_resumable(path: pathlib.Path, cfg: Stage2Config, base_fingerprint: str, inputs_digest: str,
                    inputs_options: Dict[str, str], n_clusters, base_modules: Optional[List[str]] = None) -> None:
    """What :func:`load_checkpoint` refuses that is known before the images are embedded and stages 0 and 1 run
    (the settings, the base encoder, the stage-1 inputs, and K unless it is "auto"): a refusal after them cost the
    whole embedding pass and both stages. The images are checked when the checkpoint is loaded (the readable ones
    are known only after embedding)."""
    ckpt = _read_checkpoint(path)
    _check_settings(ckpt, path, cfg, base_fingerprint, inputs_digest, inputs_options, base_modules)
    if not isinstance(n_clusters, str) and ckpt["n_clusters"] != n_clusters:
        raise ValueError(f"checkpoint {path} has {ckpt['n_clusters']} clusters but the fit asks for {n_clusters}; "
                         f"{_start_over(path)}")


def _read_checkpoint(path: pathlib.Path) -> dict:
    damage = io.torch_file_damage(path)
    if damage is not None:   # torch would load it: the run would go on from other weights
        raise ValueError(f"checkpoint {path} is damaged ({damage}); {_start_over(path)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise   # unreadable (no permission, an I/O error), not damaged: the epochs it holds may be fine
    except Exception as exc:   # truncated, empty or overwritten (torch words each differently)
        reason = first_line(exc)
        raise ValueError(f"checkpoint {path} is damaged ({reason}); {_start_over(path)}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a laic stage-2 checkpoint; {_start_over(path)}")
    if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a laic stage-2 checkpoint of version {FORMAT_VERSION}; {_start_over(path)}")
    return ckpt


def _check_settings(ckpt: dict, path: pathlib.Path, cfg: Stage2Config, base_fingerprint: str, inputs_digest: str,
                    inputs_options: Optional[Dict[str, str]], base_modules: Optional[List[str]] = None) -> None:
    saved = ckpt["config"]
    changed = [f"{k}={saved.get(k)!r} then, {v!r} now" for k, v in dataclasses.asdict(cfg).items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise ValueError(f"checkpoint {path} was written with other settings ({'; '.join(changed)}); "
                         f"{_start_over(path)}")
    if ckpt["base_fingerprint"] != base_fingerprint:
        raise ValueError(f"checkpoint {path} was written for another base encoder (its weights differ); "
                         f"{_start_over(path)}")
    if None not in (ckpt.get("base_modules"), base_modules) and ckpt["base_modules"] != base_modules:
        # (a checkpoint written before the layers were recorded is judged on its weights alone)
        raise ValueError(f"checkpoint {path} was written for the same base weights built of other layers "
                         f"({module_change(ckpt['base_modules'], base_modules)}: an open_clip tag such as OpenAI's "
                         f"builds QuickGELU, the same weights from a file GELU); resume with the encoder loaded as "
                         f"then, or {_start_over(path)}")
    if ckpt.get("inputs_digest", inputs_digest) != inputs_digest:
        raise ValueError(f"checkpoint {path} was written for "
                         f"{_options_changed(ckpt.get('inputs_options'), inputs_options)}; {_start_over(path)}")



def save_checkpoint(path: pathlib.Path, *, epoch: int, config: Stage2Config, base_fingerprint: str,
                    paths: Sequence[PathLike], n_clusters: int, trainable: dict, optimizer, scheduler, scaler,
                    pseudo_labels: dict, history: list, files: str, device: torch.device, inputs_digest: str = "",
                    inputs_options: Optional[Dict[str, str]] = None, base_modules: Optional[List[str]] = None) -> None:
    io.torch_save(path, {
        "format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "epoch": epoch,
        "config": dataclasses.asdict(config), "base_fingerprint": base_fingerprint,
        "paths_digest": paths_digest(paths), "files_digest": files, "inputs_digest": inputs_digest,
        "inputs_options": dict(inputs_options or {}),     # empty: not known (a caller that passes none)
        "n_clusters": n_clusters, "trainable": trainable,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "rng": rng_state(device), "pseudo_labels": pseudo_labels, "history": history,
        **({} if base_modules is None else {"base_modules": list(base_modules)})})
