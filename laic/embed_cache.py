"""The on-disk format of embeddings: a cache folder holds one embedding set per kind, each as an array plus a JSON
sidecar, and this module alone reads and writes it (``laic.embed`` computes what goes in; ``laic fit --features``
and ``laic report`` read it back through :func:`read_features`).

  features.npy / features.json      images: float32 [N, D], L2-normalised; row i is sidecar["files"][i]
  input_stat.npy                    images: int64 [len(sidecar["inputs"]), 2], each input file's size and
                                    modification time in ns as the run found them (laic.images.files_stat)
  embeddings.npy / embeddings.json  texts (prompt-ensembled), same layout as a vocabulary folder (+ nouns.txt);
                                    row i is sidecar["texts"][i] (recorded since 12-07, for an update)

The sidecar records the model name, the weights digest (``laic.clip.weights_digest``), the model's leaf layer classes
(``laic.clip.module_classes``: the same weights build QuickGELU from OpenAI's tag, GELU from a file), the
preprocessing (or the prompt templates), and the inputs (the file list with a digest of sizes and modification times,
or a digest of the texts). Files are written atomically (laic.io) and the sidecar last, so a cache is either complete
or absent. While a run is going on, finished shards are kept in ``.<stem>.shards/`` beside the array; an interrupted
run resumes from them and they are removed at the end.

A folder that already holds embeddings made differently (another model or weights, other preprocessing or templates,
other files) is never silently reused or replaced: it raises ValueError saying what differs; pass ``overwrite=True``
(CLI: ``--overwrite``) to replace it, or use another folder. ``overwrite`` computes the embeddings again even where
the folder's match (an image unreadable then, e.g. for want of permission, which leaves the files' sizes and times
alone, is embedded this time); an interrupted overwrite resumes from its shards like any run.

``update=True`` (CLI: ``laic embed --update``) brings an image cache of the same model, weights, layers and
preprocessing up to date with the files as they are now: the rows of files at the same path with the same size and
modification time are kept, the files added or changed since are embedded, and so are those skipped as unreadable
then (a few: a file unreadable for want of permission then may be readable now); the result, the same as a run from
scratch, replaces the earlier one as a whole (the disk space a run from scratch takes is needed). Its shards hold kept
and new rows alike, so an interrupted update resumes like any run. An update also takes over an interrupted run
embedded alike of other files (a first run stopped before files were added or changed, or an update stopped before
more changed): the rows of its finished shards are kept in ``.features.earlier/`` (the rows, and each one's file name,
size and time; EarlierRows) until the update finishes, and those of files unchanged since are used like the earlier
result's, so that stopping it again loses nothing either. For that a run records its inputs' sizes and times beside
its shards; the shards of runs started before it did (12-07) are refused, or discarded beside a result the update
keeps rows of. Caches written before ``input_stat.npy`` (12-07) cannot be updated: nothing says which of
their files changed. A text cache (CLI: ``laic vocab --update``) is updated alike by name: the rows of the texts it
holds are kept, in the new order, and the texts added are encoded; one written before its sidecar held its texts
(12-07) is updated by the vocabulary folder's nouns.txt beside it, where that holds the names it was encoded from.
A text run records its texts beside its shards (``texts.json``, since 12-07 night), and an update takes over an
interrupted run of another list as an image update does (a first `laic vocab` stopped, then its list edited): the
rows its finished shards hold of the names still listed are kept (``.embeddings.earlier/``).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import shutil
import time
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import io as laic_io
from .clip import module_change
from .images import PathLike, files_digest
from .inputs import as_fit_array, non_finite_rows_message, zero_rows_message

CACHE_FORMAT = 1
IMAGE_STEM = "features"
TEXT_STEM = "embeddings"
FILE_LIST = "files.txt"   # beside an image cache: its files, one a line (laic.embed writes it, for reading)
# Beside a text cache that is a vocabulary folder: its names, one a line (laic.vocab writes it).
NAMES_FILE = "nouns.txt"
INPUT_STAT = "input_stat.npy"   # beside an image cache: its inputs' sizes and times, for an update (the module doc)
RUN_TEXTS = "texts.json"        # beside a text run's shards: its texts, for an update that takes the run over
# The text files each kind of cache writes beside its array (Cache.finish).
TEXT_FILES = {IMAGE_STEM: (FILE_LIST,), TEXT_STEM: ()}

# What makes two embedding sets the same; everything else in a sidecar is description.
IDENTITY_KEYS = ("kind", "format", "model", "weights_digest", "preprocess", "templates", "inputs_digest")
# Identity recorded since 12-06 (the model's layer classes, laic.clip.module_classes, which tell a QuickGELU build of
# the same weights from a GELU one): compared where a record holds it, so that the caches written before stay readable.
LATER_IDENTITY_KEYS = ("modules",)


# How to get past a folder that cannot be reused, right for every caller of its kind: an image cache is `laic embed`'s
# --out or `laic fit`'s --embed-cache (whose own --overwrite replaces the run, not this folder), a text one `laic
# vocab`'s --out.
ANOTHER_FOLDER = {IMAGE_STEM: "use another folder (--out of laic embed, --embed-cache of laic fit)",
                  TEXT_STEM: "use another folder (--out of laic vocab)"}
REPLACE_IT = {IMAGE_STEM: "replace it with laic embed --overwrite (overwrite=True in Python)",
              TEXT_STEM: "replace it with laic vocab --overwrite (overwrite=True in Python)"}
# What an update keeps of an interrupted run it takes over (Cache._keep_rows_of_run), in its refusal's words.
TAKEN_OVER = {IMAGE_STEM: "keeping the rows of its finished shards' files unchanged since",
              TEXT_STEM: "keeping the rows its finished shards hold of the names still listed"}
UPDATE_IT = {IMAGE_STEM: "bring it up to date with laic embed --update (laic.embed.embed_images(update=True) in "
                         "Python), which embeds only the files added or changed since",
             TEXT_STEM: "bring it up to date with laic vocab --update (laic.embed.embed_texts(update=True) in "
                        "Python), which encodes only the names added since"}

def _describe_mismatch(found: Dict, wanted: Dict) -> str:
    found = _as_recorded_now(found, wanted)
    diffs = [key for key in IDENTITY_KEYS + LATER_IDENTITY_KEYS if found.get(key) != wanted.get(key)]
    if "inputs_digest" in diffs and "inputs" in wanted:
        diffs[diffs.index("inputs_digest")] = f"the image files ({_files_change(found, wanted)})"
    elif "inputs_digest" in diffs:
        diffs[diffs.index("inputs_digest")] = "the texts"
    if "model" in diffs or "weights_digest" in diffs:
        return (f"it was written by model {found.get('model')!r} (weights {str(found.get('weights_digest'))[:12]}), "
                f"not {wanted.get('model')!r} (weights {str(wanted.get('weights_digest'))[:12]})")
    if "modules" in diffs:
        change = module_change(found["modules"], wanted["modules"])
        return (f"it was embedded by the same weights built of other layers ({change}: an open_clip tag such as "
                "OpenAI's builds QuickGELU, the same weights from a file GELU)")
    return "it differs in " + ", ".join(diffs)


def _files_change(found: Dict, wanted: Dict) -> str:
    """How the image files ``wanted`` differ from those ``found`` was made from (their digests differ)."""
    before, after = found.get("inputs", []), wanted["inputs"]
    added, removed = len(set(after) - set(before)), len(set(before) - set(after))
    if added or removed:
        return f"{added} file(s) added and {removed} removed"
    since = "modified since (size or modification time)"
    if list(before) == list(after):
        return f"some files were {since}"
    # The same set in another order (a list input): modified too only where the found order's digest is no longer
    # the one recorded.
    if files_digest([laic_io.text_path(p) for p in before]) == found.get("inputs_digest"):   # as recorded: bytes
        return "the same files in another order"
    return f"the same files in another order, some of them {since}"


def _read_record(path: pathlib.Path) -> Dict:
    """A sidecar or a run's record: a JSON object, else a ValueError that names the file as damaged (``null`` read
    as no sidecar at all, ``[]`` raised an AttributeError)."""
    record = laic_io.read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: damaged, not the JSON object laic wrote there (found {type(record).__name__})")
    return record


def _as_recorded_now(found: Dict, wanted: Dict) -> Dict:
    """``found`` (a sidecar or run record) with the later identity keys it lacks taken from ``wanted``: a record
    written before they were is judged on what it holds."""
    return {**{k: wanted.get(k) for k in LATER_IDENTITY_KEYS}, **found}


def _identity_matches(found: Dict, wanted: Dict, leave_out: Tuple[str, ...] = ()) -> bool:
    found = _as_recorded_now(found, wanted)
    return all(found.get(k) == wanted.get(k) for k in IDENTITY_KEYS + LATER_IDENTITY_KEYS if k not in leave_out)


def _embedded_alike(found: Dict, wanted: Dict) -> bool:
    """Whether ``found`` (a finished cache's sidecar) holds rows ``wanted`` could keep: the same kind, model,
    weights, layers and preprocessing (images) or templates (texts), whatever the inputs (an update's condition)."""
    return _identity_matches(found, wanted, leave_out=("inputs_digest",))


# What an update does with item i of its inputs (KeptRows.rows[i] >= 0: the earlier cache's row it keeps).
EMBED = -1


@dataclasses.dataclass
class KeptRows:
    """What an update keeps of the earlier result and of the runs it took over: ``rows[i]`` is the row of
    ``features`` (the result's array, memory-mapped, or StackedRows of it and EarlierRows') that item i keeps,
    ``EMBED`` where the item is embedded now."""

    rows: np.ndarray
    features: Union[np.ndarray, "StackedRows"]

    def to_embed(self, start: int, end: int) -> np.ndarray:
        """The items of ``start:end`` that are embedded now."""
        return start + np.flatnonzero(self.rows[start:end] == EMBED)

    def merged(self, start: int, end: int, part: Tuple[np.ndarray, np.ndarray, np.ndarray]
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The shard ``start:end`` whole: ``part`` (its items embedded now: features, kept and skipped indices) with
        the rows kept, in item order (as a run from scratch writes it)."""
        features, kept, skipped = part
        here = self.rows[start:end]
        old = here >= 0
        kept = np.concatenate([kept, start + np.flatnonzero(old)])
        order = np.argsort(kept, kind="stable")
        rows = [f for f in (features, np.asarray(self.features[here[old]], np.float32)) if f.size]
        return shard_part([np.concatenate(rows)[order]] if rows else [], kept[order], skipped)


class StackedRows:
    """The rows of several arrays (memory-mapped ones stay on disk) as one array's, for :class:`KeptRows`: an update
    keeps rows of the finished result and of the interrupted runs it took over."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])

    @classmethod
    def of(cls, parts: Sequence[np.ndarray]) -> Union[np.ndarray, "StackedRows"]:
        """The rows of ``parts``: the one array itself where there is one (a memory map read directly)."""
        return parts[0] if len(parts) == 1 else cls(parts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.parts[0].shape[1]), np.float32)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        for j, part in enumerate(self.parts):
            here = part_of == j
            if here.any():
                out[here] = part[rows[here] - self.starts[j]]
        return out


@dataclasses.dataclass
class EarlierRows:
    """Rows an update took over from interrupted runs of other files (``Cache._keep_rows_of_run``): ``features``
    [R, D], and each row's file ``names`` and ``stat`` (size and modification time then). Kept in a folder beside the
    cache (``.features.earlier/``) until the update finishes. A rewrite writes its arrays under new names and then
    the record that names them (one atomic replace), and only then deletes the earlier arrays: a stop anywhere leaves
    the earlier rows or the new ones, whole (replacing the three files together lost both to a SIGKILL between the
    moves)."""

    names: List[str]
    stat: np.ndarray
    features: np.ndarray

    RECORD = "record.json"

    def write(self, folder: pathlib.Path, identity: Dict) -> None:
        alike = {k: identity.get(k) for k in IDENTITY_KEYS + LATER_IDENTITY_KEYS if k != "inputs_digest"}
        generation = f"{time.time_ns():x}"
        arrays = {"features": f"features-{generation}.npy", "stat": f"input_stat-{generation}.npy"}
        laic_io.save_npy(folder / arrays["features"], self.features)
        laic_io.save_npy(folder / arrays["stat"], self.stat)
        laic_io.write_json(folder / self.RECORD, dict(alike, names=self.names, arrays=arrays))
        for earlier in folder.iterdir():
            if earlier.name not in (self.RECORD, *arrays.values()):
                earlier.unlink(missing_ok=True)

    @classmethod
    def read(cls, folder: pathlib.Path, identity: Dict) -> Optional["EarlierRows"]:
        """The rows kept in ``folder`` when they were embedded as ``identity`` says (the same model, weights, layers
        and preprocessing), else None; a damaged record (the disk) is as none: its files are embedded again."""
        try:
            record = _read_record(folder / cls.RECORD)
            arrays = {key: folder / pathlib.Path(record["arrays"][key]).name for key in ("features", "stat")}
            features = laic_io.read_npy(arrays["features"], arrays["features"].name, mmap=True)
            stat = laic_io.read_npy(arrays["stat"], arrays["stat"].name)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        names = record.get("names")
        if not (_embedded_alike(record, identity) and isinstance(names, list)
                and features.ndim == 2 and features.shape[0] == len(names) and stat.shape == (len(names), 2)):
            return None
        return cls(names, stat.astype(np.int64), features)

    def without(self, names: Sequence[str]) -> "EarlierRows":
        """These rows but those of ``names`` (taken over again from a newer run)."""
        newer = set(names)
        keep = np.array([name not in newer for name in self.names], bool)
        return EarlierRows([n for n, k in zip(self.names, keep) if k], self.stat[keep], np.asarray(self.features[keep]))


def unchanged_rows(names: Sequence[str], stat_rows: np.ndarray, earlier_names: Sequence[str],
                   earlier_stat: np.ndarray, earlier_row: np.ndarray) -> np.ndarray:
    """For each of an update's inputs (``names``, their ``stat_rows``), the row an earlier embedding holds of it
    (``earlier_row`` of ``earlier_names[i]``, whose size and time were ``earlier_stat[i]``) where the file is unchanged
    since (the same name, size and time), else EMBED."""
    if not len(earlier_names):
        return np.full(len(names), EMBED, np.int64)
    index = {name: i for i, name in enumerate(earlier_names)}
    earlier = np.array([index.get(name, -1) for name in names], np.int64)
    listed = earlier >= 0
    at = np.where(listed, earlier, 0)
    same = listed & (stat_rows[:, 0] >= 0) & (earlier_stat[at] == stat_rows).all(axis=1)
    return np.where(same, earlier_row[at], EMBED)


class Cache:
    """One embedding set in ``folder``: ``<stem>.npy`` + ``<stem>.json``, and resumable shards while computing."""

    def __init__(self, folder: PathLike, stem: str, identity: Dict, n_items: int, shard_size: int, overwrite: bool,
                 update: bool = False, stat_rows: Optional[np.ndarray] = None, texts: Optional[List[str]] = None):
        self.folder = pathlib.Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{str(self.folder)!r} exists and is not a folder; pass a folder for the {stem}.npy "
                             "it writes")
        self.array_path = self.folder / f"{stem}.npy"
        self.sidecar_path = self.folder / f"{stem}.json"
        self.text_paths = [self.folder / name for name in TEXT_FILES[stem]]
        self.stat_path = self.folder / INPUT_STAT if stem == IMAGE_STEM else None
        self.update_it, self.taken_over = UPDATE_IT[stem], TAKEN_OVER[stem]
        self.shard_dir = self.folder / f".{stem}.shards"
        # An image run's inputs' sizes and times (laic.images.files_stat), recorded beside its shards: what lets an
        # update take over the run once files changed (EarlierRows).
        self.stat_rows = stat_rows
        self.run_stat_path = self.shard_dir / INPUT_STAT if self.stat_path else None
        # A text run's texts, recorded beside its shards alike: the names its rows are of, once the list was edited.
        self.texts = texts
        self.run_texts_path = None if self.stat_path else self.shard_dir / RUN_TEXTS
        self.earlier_dir = earlier_rows_dir(self.folder, stem)
        self.identity = identity
        self.n_items = n_items
        self.shard_size = shard_size
        self.overwrite = overwrite
        self.update = update
        self.what = f"{'image features' if stem == IMAGE_STEM else 'text embeddings'} in {str(self.folder)!r}"
        self.another_folder, self.replace_it = ANOTHER_FOLDER[stem], REPLACE_IT[stem]
        # Removes the folder only where it made it and nothing was kept (every image unreadable, a refusal): the
        # user's --out may have been made empty on purpose.
        self._lock = laic_io.FolderLock(
            self.folder, f"cannot compute the {self.what}: another process is computing embeddings in that folder "
                         f"now; wait for it to end, or {self.another_folder}", remove_empty=False,
            remove_if_made=True)

    def check_shared(self, rank: int, finished: bool) -> None:
        """On a process group, after process 0 found the cache ``finished`` or started a run in it: this process
        sees that too, so that the folder is one that every process reaches (their shards would go elsewhere)."""
        if not (self.sidecar_path if finished else self.shard_dir / "run.json").is_file():
            raise ValueError(f"cache folder {str(self.folder)!r}: process {rank} does not see what process 0 wrote "
                             "there; under torchrun the cache folder must be one that every process reaches (a "
                             "shared filesystem, the same path)")

    def _refuse(self, found: Dict) -> None:
        # A cache of other inputs that records what an update needs can be updated instead.
        update = f"{self.update_it}, " if _embedded_alike(found, self.identity) and self._updatable(found) else ""
        raise ValueError(f"cannot reuse the {self.what}: {_describe_mismatch(found, self.identity)}; "
                         f"{update}{self.another_folder}, or {self.replace_it}")

    def _refuse_to_resume(self, found: Dict) -> None:
        """The folder holds an interrupted run of other inputs or another model (``found``, its run.json): said as
        such, with what replacing it throws away (it was "cannot reuse the features", of a folder holding none)."""
        done, total = shard_progress(self.folder, self.array_path.stem) or (0, 0)
        update = f"{self.update_it} ({self.taken_over}), " if self._can_be_taken_over(found) else ""
        raise ValueError(f"cannot finish the interrupted run of {self.what} ({done} of {total} shards done): "
                         f"{_describe_mismatch(found, self.identity)}; rerun it as it was started to finish it, "
                         f"{update}{self.another_folder}, or {self.replace_it} (which deletes its finished shards)")

    def load(self) -> Optional[Tuple[np.ndarray, Dict]]:
        """The finished result when the folder holds one made the same way, None when there is none; raises when it
        holds one made differently or damaged. With overwrite always None: whatever is there is computed again (a
        result made differently or damaged, and one made the same way too: an image skipped as unreadable then, for
        want of permission, is embedded this time, as the "readable now" warning says; chmod leaves the size and
        time that identify the files). It stays, whole, until finish() replaces it, so that an interrupted run loses
        nothing (rerun with overwrite to resume from its shards)."""
        return None if self.overwrite else self.finished()

    def finished(self) -> Optional[Tuple[np.ndarray, Dict]]:
        """load() whatever overwrite says: the result made the same way or None, else an error saying what is wrong
        (how the other processes of a group read back what process 0 has just written)."""
        if not self.sidecar_path.is_file():
            # An array (or a files.txt, a list of the user's) with neither sidecar nor shards was not written by us
            # (e.g. a shared vocabulary folder): never overwrite someone else's data unasked.
            theirs = next((p for p in [self.array_path, *self.text_paths] if p.is_file()), None)
            if theirs is not None and not self.shard_dir.exists():
                raise ValueError(f"{str(theirs)!r} exists but was not written by laic (no "
                                 f"{self.sidecar_path.name} beside it); {self.another_folder}, or {self.replace_it}")
            return None
        try:
            found = _read_record(self.sidecar_path)
        except ValueError as exc:   # damaged: what it described is unknown
            raise ValueError(f"{exc}; {self.replace_it} to compute the {self.what} again, or delete "
                             f"{self._own_files()}") from None
        if self._to_update(found):
            self._earlier_inputs(found)   # (can it be? said before the run starts)
            return None
        if not _identity_matches(found, self.identity):
            self._refuse(found)
        self._check_whole(found)
        self._remove_leftovers_if_free()   # a finished cache is only read from now on: the last chance to sweep
        return np.load(self.array_path, allow_pickle=False).astype(np.float32, copy=False), found

    def _check_whole(self, found: Dict) -> None:
        damage = self._damage(found)
        if damage is not None:
            raise ValueError(f"the {self.what} are damaged ({damage}); {self.replace_it} to compute them again, or "
                             f"delete {self._own_files()}")

    def _own_files(self) -> str:
        """The files of a finished result, in words (deleting two of them left the others refused as a user's)."""
        names = [p.name for p in (self.sidecar_path, self.array_path, *self.text_paths, self.stat_path) if p]
        return ", ".join(names[:-1]) + " and " + names[-1]

    def _to_update(self, found: Dict) -> bool:
        """Whether this run updates the finished result ``found`` (its sidecar): asked to, and it is of other inputs
        embedded alike."""
        return self.update and _embedded_alike(found, self.identity) and not _identity_matches(found, self.identity)

    def _updatable(self, found: Dict) -> bool:
        """Whether the result ``found`` (its sidecar) says what an update needs: an image cache's inputs' sizes and
        times, a text cache's texts (:func:`recorded_texts`)."""
        return "input_stat" in found if self.stat_path else recorded_texts(self.folder, found) is not None

    def _earlier_inputs(self, found: Dict):
        """What an update of the result ``found`` (its sidecar) compares its inputs with, checked: an image cache's
        inputs' sizes and times, a text cache's texts."""
        return self._earlier_stat(found) if self.stat_path else self._earlier_texts(found)

    def _earlier_texts(self, found: Dict) -> List[str]:
        """The texts of the rows of the result ``found`` (a text cache's sidecar), checked (:func:`recorded_texts`)."""
        self._check_whole(found)
        texts = recorded_texts(self.folder, found)
        if texts is not None and len(texts) == found["rows"]:
            return texts
        if "texts" in found:
            raise ValueError(f"cannot update the {self.what}: they are damaged ({self.sidecar_path.name}'s texts "
                             f"are not the {found.get('rows')} names its digest says); {self.replace_it} to "
                             "compute them again")
        raise ValueError(f"cannot update the {self.what}: they were written before laic kept their names in "
                         f"{self.sidecar_path.name} (12-07), and no {NAMES_FILE} beside them holds the names they "
                         f"were encoded from, so nothing says which row is which name's; {self.replace_it}, which "
                         f"encodes every name again (and records them: later updates work), or {self.another_folder}")

    def _earlier_stat(self, found: Dict) -> np.ndarray:
        """The sizes and times of the inputs of the result ``found`` (its sidecar) that an update compares, checked."""
        if "input_stat" not in found:
            raise ValueError(f"cannot update the {self.what}: they were written before laic kept each file's size and "
                             "modification time (12-07), so nothing tells the files changed since from the others; "
                             f"{self.replace_it}, which embeds every image again (and records them: later updates "
                             f"work), or {self.another_folder}")
        self._check_whole(found)
        damage = _listing_damage(found)
        if damage is None:
            try:
                stat_rows = laic_io.read_npy(self.stat_path, self.stat_path.name)
                if stat_rows.shape != (len(found["inputs"]), 2) or not np.issubdtype(stat_rows.dtype, np.integer):
                    damage = (f"{self.stat_path.name} holds {stat_rows.dtype} {stat_rows.shape} for "
                              f"{len(found['inputs'])} inputs")
            except (FileNotFoundError, ValueError) as exc:
                damage = str(exc)
        if damage is not None:
            raise ValueError(f"cannot update the {self.what}: they are damaged ({damage}); {self.replace_it} to "
                             "compute them again")
        return stat_rows.astype(np.int64)

    def rows_to_keep(self, stat_rows: np.ndarray) -> Optional[KeptRows]:
        """What this run keeps when it updates (:meth:`_to_update`) the finished result in the folder, or takes over
        interrupted runs of other files (:meth:`_keep_rows_of_run`): the rows of the files unchanged since (same path,
        size and modification time; ``stat_rows``: this run's inputs', laic.images.files_stat); None where it updates
        nothing. The files skipped as unreadable then are embedded again (a few; one unreadable for want of
        permission then may be readable now, and a run from scratch would embed it). Every process of a group
        reads it."""
        found = self._result_to_update()
        earlier = EarlierRows.read(self.earlier_dir, self.identity) if self.update else None
        sources = []
        if found is not None:
            earlier_stat = self._earlier_stat(found)    # (checks the lists first)
            input_of = {name: i for i, name in enumerate(found["inputs"])}
            row_of_input = np.full(len(found["inputs"]), EMBED, np.int64)
            row_of_input[[input_of[name] for name in found["files"]]] = np.arange(len(found["files"]))
            sources.append((found["inputs"], earlier_stat, row_of_input,
                            laic_io.read_npy(self.array_path, self.array_path.name, mmap=True)))
        if earlier is not None:
            sources.append((earlier.names, earlier.stat, np.arange(len(earlier.names)), earlier.features))
        if not sources:
            return None
        rows, offset = np.full(len(stat_rows), EMBED, np.int64), 0
        for names, stat, row_of, features in sources:     # the runs taken over last: newer than the result
            these = unchanged_rows(self.identity["inputs"], stat_rows, names, stat, row_of)
            rows = np.where(these != EMBED, these + offset, rows)
            offset += len(features)
        return KeptRows(rows, StackedRows.of([src[3] for src in sources]))

    def text_rows_to_keep(self, texts: Sequence[str]) -> Optional[KeptRows]:
        """:meth:`rows_to_keep` of a text cache: the rows of the ``texts`` the earlier result or the interrupted runs
        it took over hold (the first of a text held twice), whatever their order there; None where it updates
        nothing. (A text's row depends on the model and templates alone, alike in all of them.)"""
        found = self._result_to_update()
        earlier = EarlierRows.read(self.earlier_dir, self.identity) if self.update else None
        sources = []
        if found is not None:
            sources.append((self._earlier_texts(found), laic_io.read_npy(self.array_path, self.array_path.name,
                                                                         mmap=True)))
        if earlier is not None:
            sources.append((earlier.names, earlier.features))
        if not sources:
            return None
        row_of: Dict[str, int] = {}
        offset = 0
        for names, features in sources:
            for row, text in enumerate(names):
                row_of.setdefault(text, offset + row)
            offset += len(features)
        rows = np.array([row_of.get(text, EMBED) for text in texts], np.int64)
        return KeptRows(rows, StackedRows.of([src[1] for src in sources]))

    def _result_to_update(self) -> Optional[Dict]:
        """The sidecar of the finished result this run updates (:meth:`_to_update`), None where there is none."""
        if not (self.update and self.sidecar_path.is_file()):
            return None
        found = _read_record(self.sidecar_path)
        return found if self._to_update(found) else None

    def _damage(self, found: Dict) -> Optional[str]:
        """What is wrong with the finished array its sidecar ``found`` describes (None: nothing)."""
        try:
            rows = laic_io.read_npy(self.array_path, self.array_path.name, mmap=True).shape[0]
        except (FileNotFoundError, ValueError) as exc:
            return str(exc)
        if rows != found.get("rows"):
            return f"{self.array_path.name} has {rows} rows, its sidecar says {found.get('rows')}"
        return None

    def ranges(self) -> List[Tuple[int, int]]:
        return [(s, min(self.n_items, s + self.shard_size)) for s in range(0, self.n_items, self.shard_size)]

    def _shard_path(self, start: int, end: int) -> pathlib.Path:
        return self.shard_dir / f"shard_{start:09d}_{end:09d}.npz"

    def _hold_folder(self) -> None:
        """Only one process on this machine computes into a cache folder at a time, until its ``finish`` (or its
        end, however it ends: laic.io.FolderLock, the kernel's lock on the folder, which a forked DataLoader worker
        does not keep). Two runs at once (one with overwrite) deleted each other's shards, and one finished with the
        other model's rows under its own sidecar. Where the filesystem takes no such lock (some network ones), the
        run goes on without it. A result another process finished since ``load`` looked is judged again, now that
        the folder is held."""
        self._lock.take()
        if not self._lock.held:
            return
        self._remove_leftovers()
        if self.sidecar_path.is_file() and not self.overwrite:
            try:
                found = _read_record(self.sidecar_path)
            except ValueError:
                found = {}
            if not (_identity_matches(found, self.identity) or self._to_update(found)):
                self.release()
                self._refuse(found)

    def _remove_leftovers(self) -> None:
        """What a killed run (SIGKILL: no clean-up ran) left in the folder, which only its holder may touch: the
        temporaries of the writes of its files (laic.io.atomic_path's; the array's as large as the array: 2.6 GB at
        ImageNet scale, files.txt's 60 MB, and a finished cache is never written again, so they stayed for good), a
        shard folder whose deletion was cut short, and the shards of the finished result itself (a stop between its
        sidecar's write and their deletion: an update of it was then refused as an interrupted run), with the rows an
        update took over (EarlierRows) that the finish had not deleted yet. (Rows taken over beside a finished result
        and no shards are not a cut finish's: an update stopped between its takeover and its own run's start.)"""
        for path in (self.array_path, self.sidecar_path, *self.text_paths, self.stat_path):
            for leftover in self.folder.glob(f".{glob.escape(path.name)}.*.tmp") if path else ():
                leftover.unlink(missing_ok=True)
        if self._doomed_shards().exists():
            shutil.rmtree(self._doomed_shards(), ignore_errors=True)
        if self._shards_of_the_finished_result():
            self._forget_earlier_rows()
            self._discard_shards()

    def _shards_of_the_finished_result(self) -> bool:
        """Whether the shards in the folder are those of the finished result beside them: the same identity and
        inputs, and not an overwrite's (which computes a matching result again, and resumes)."""
        try:
            run, found = (_read_record(p) for p in (self.shard_dir / "run.json", self.sidecar_path))
        except (OSError, ValueError):
            return False
        return (not run.get("overwrite") and _identity_matches(run, found) and _identity_matches(found, run)
                and run.get("inputs") == found.get("inputs"))

    def _remove_leftovers_if_free(self) -> None:
        """:meth:`_remove_leftovers` where no process computes in the folder now (its lock free, taken for the
        sweep), and the folder may be written; nothing otherwise (a run under way owns its temporaries)."""
        sweep = laic_io.FolderLock(self.folder, "busy", remove_empty=False)
        try:
            sweep.take()
            if sweep.held:
                self._remove_leftovers()
        except (ValueError, OSError):   # held by a run under way, or a folder this user may not read or write
            pass
        finally:
            sweep.release()

    def _doomed_shards(self) -> pathlib.Path:
        return self.shard_dir.with_name(self.shard_dir.name + ".deleted")

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Let other processes compute in the folder (after ``finish``, or when the run failed or was stopped)."""
        self._lock.release()

    def start_run(self) -> List[Tuple[int, int]]:
        """The shard ranges still to compute: all of them, or those a previous interrupted run did not finish."""
        # Only now: a finished cache in a folder this process may not write (a shared, read-only one) is still read.
        laic_io.check_can_create(self.array_path, "the cache folder")
        self._hold_folder()
        if self.overwrite:      # computes every row again: what updates took over is of no use
            self._forget_earlier_rows()
        run_meta = {k: self.identity.get(k) for k in IDENTITY_KEYS + LATER_IDENTITY_KEYS + ("inputs",)}
        run_meta.update(shard_size=self.shard_size, n_items=self.n_items, overwrite=bool(self.overwrite))
        meta_path = self.shard_dir / "run.json"
        if meta_path.is_file():
            try:
                found = _read_record(meta_path)
            except ValueError:   # written whole, so damaged since: its shards cannot be trusted either
                self._discard_shards()
        if meta_path.is_file():
            found = _as_recorded_now(found, self.identity)
            if not (_identity_matches(found, self.identity) or self.overwrite):
                if self._taken_over_by_update(found):
                    self._keep_rows_of_run(found)
                elif not self._abandoned_by_update(found):
                    self._refuse_to_resume(found)
            if not self.overwrite:
                # A run resumes an overwrite's shards as its own; an overwrite resumes an overwrite's only (another
                # run's, or a finished one's left over, kept the images unreadable then skipped: it reads them anew).
                found = dict(found, overwrite=False)
            if found != run_meta and found == dict(run_meta, shard_size=found.get("shard_size")):
                # The same inputs asked in another shard size: finish in the first run's (the features do not depend
                # on it), keeping its shards (before, they were all computed again without a word).
                self.shard_size = run_meta["shard_size"] = found["shard_size"]
            if found != run_meta:
                self._discard_run()  # overwrite: start afresh
        if not meta_path.is_file():
            # Shards without their run's record are of no known run: never this one's.
            self._discard_shards()
            # Before the record that makes it a run.
            if self.run_stat_path is not None and self.stat_rows is not None:
                laic_io.save_npy(self.run_stat_path, self.stat_rows)
            if self.run_texts_path is not None and self.texts is not None:
                laic_io.write_json(self.run_texts_path, {"texts": list(self.texts)})
            laic_io.write_json(meta_path, run_meta)
        return [r for r in self.ranges() if not self._finished_shard(self._shard_path(*r))]

    def _can_be_taken_over(self, run: Dict) -> bool:
        """Whether an update could take the rows of the interrupted ``run`` (its run.json) of other inputs: one
        embedded alike that recorded its inputs beside its shards (an image run its files' sizes and times, since
        12-07; a text run its texts, since 12-07 night)."""
        record = self.run_stat_path or self.run_texts_path
        return bool(record.is_file() and _embedded_alike(run, self.identity))

    def _taken_over_by_update(self, run: Dict) -> bool:
        """Whether this run takes over the interrupted ``run``: an update, of a run that can be, beside no finished
        result or the one it updates."""
        return self.update and self._can_be_taken_over(run) and (not self.sidecar_path.is_file()
                                                                 or self._abandoned_by_update(run))

    def _keep_rows_of_run(self, run: Dict) -> None:
        """Keep the rows of the interrupted ``run``'s finished shards, with those kept from the runs it took over in
        turn, among the earlier rows (:class:`EarlierRows`), before its shards are discarded; a run whose record or
        sizes and times do not add up (damaged) gives none."""
        try:
            inputs, stat = self._inputs_of_run(run)
            n_items, size = int(run["n_items"]), int(run["shard_size"])
        except (KeyError, TypeError, ValueError, OSError):
            return
        if not (isinstance(inputs, list) and len(inputs) == n_items and stat.shape == (n_items, 2) and size > 0):
            return
        parts = []
        for start in range(0, n_items, size):
            path = self._shard_path(start, min(n_items, start + size))
            try:
                parts.append(_read_shard(path))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                pass    # not finished, or damaged: its files are embedded again
        features, kept, _ = concat_parts(parts)
        if not len(kept):
            return
        names = [inputs[i] for i in kept]
        rows = EarlierRows(names, stat[kept], features)
        earlier = EarlierRows.read(self.earlier_dir, self.identity)
        if earlier is not None:
            earlier = earlier.without(names)
            rows = EarlierRows(earlier.names + names, np.concatenate([earlier.stat, rows.stat]),
                               np.concatenate([earlier.features, features]))
        rows.write(self.earlier_dir, self.identity)

    def _inputs_of_run(self, run: Dict) -> Tuple[List[str], np.ndarray]:
        """The inputs of the interrupted ``run`` (its run.json) and their sizes and times: an image run's files, a
        text run's texts (their "sizes and times" zeros: a text's row is kept by the text alone)."""
        if self.run_stat_path is not None:
            return run["inputs"], laic_io.read_npy(self.run_stat_path, self.run_stat_path.name).astype(np.int64)
        texts = _read_record(self.run_texts_path)["texts"]
        if not (isinstance(texts, list) and all(isinstance(text, str) for text in texts)):
            raise ValueError(f"{self.run_texts_path.name} holds no list of texts")
        return texts, np.zeros((len(texts), 2), np.int64)

    def _forget_earlier_rows(self) -> None:
        if self.earlier_dir.exists():
            shutil.rmtree(self.earlier_dir)

    def _abandoned_by_update(self, run: Dict) -> bool:
        """Whether this update may discard the shards of the interrupted ``run`` (its run.json): embedded alike, of
        other files (an update stopped before more files changed), beside the finished result it updates, whose rows
        it keeps anyway (only the rows that run embedded are lost; another model's run is refused as before)."""
        if not (self.update and _embedded_alike(run, self.identity) and self.sidecar_path.is_file()):
            return False
        try:
            return self._to_update(_read_record(self.sidecar_path))
        except ValueError:
            return False

    @staticmethod
    def _finished_shard(path: pathlib.Path) -> bool:
        """Whether the shard at ``path`` is there and readable; a damaged one (they are written whole, so damaged
        since) is deleted, to be computed again."""
        if not path.is_file():
            return False
        try:
            with np.load(path, allow_pickle=False) as shard:
                if set(shard.files) == {"features", "kept", "skipped"}:
                    return True
        except (ValueError, EOFError, zipfile.BadZipFile):
            pass   # not a shard any more (an OSError, e.g. no permission, is raised: the shard may be fine)
        path.unlink()
        return False

    def save_shard(self, start: int, end: int, features: np.ndarray, kept: np.ndarray, skipped: np.ndarray) -> None:
        with laic_io.atomic_path(self._shard_path(start, end)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=features, kept=kept, skipped=skipped)

    def gather(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All shards in order: (features of kept items, kept item indices, skipped item indices)."""
        parts = []
        for start, end in self.ranges():
            path = self._shard_path(start, end)
            try:
                parts.append(_read_shard(path))
            except FileNotFoundError:
                raise ValueError(f"the shard {path} of the {self.what} is missing: a process wrote it elsewhere "
                                 "(under torchrun the cache folder must be one that every process reaches), or it "
                                 "was deleted; rerun the same command to compute it again") from None
            except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                path.unlink(missing_ok=True)
                raise ValueError(f"the shard {path} of the {self.what} was damaged while the run went on ({exc}); "
                                 "it is deleted: rerun the same command to compute it again") from None
        return concat_parts(parts)

    def finish(self, array: np.ndarray, sidecar: Dict, texts: Optional[Dict[str, str]] = None,
               stat_rows: Optional[np.ndarray] = None) -> None:
        """Write the result (the text files ``texts`` by name, an image cache's ``stat_rows`` of its inputs,
        ``array``, then ``sidecar``) over any earlier one: all to temporaries first (seconds at ImageNet's size: a
        Ctrl-C then left neither result, and once the files changed no rerun could finish or update it), then moved
        into place with Ctrl-C and SIGTERM held (laic.io.replace_together). The earlier sidecar goes before the
        moves: should they be cut (SIGKILL) the folder holds no result that could pair one run's sidecar with
        another's rows, and the shards, removed last, let a rerun finish it."""
        writes = {self.folder / name: laic_io.bytes_writer(laic_io.text_bytes(text))
                  for name, text in (texts or {}).items()}
        if stat_rows is not None:
            writes[self.stat_path] = laic_io.npy_writer(stat_rows)
            sidecar["input_stat"] = self.stat_path.name
        writes[self.array_path] = laic_io.npy_writer(array)
        writes[self.sidecar_path] = laic_io.bytes_writer(laic_io.json_bytes(sidecar))   # last: marks it complete
        laic_io.replace_together(writes, before_moves=lambda: self.sidecar_path.unlink(missing_ok=True))
        self._forget_earlier_rows()     # before the shards, which tell a cut finish (_remove_leftovers)
        self._discard_shards()
        self.release()

    def discard_empty_run(self) -> None:
        """Discard the shards of this run, which kept no row (every image unreadable): they hold nothing to resume,
        and the rerun after the images were fixed was refused as the interrupted run of other files. Only the
        shards: files beside them are an earlier result, or the user's (``_discard_run`` took those for the
        leftovers of a cut ``finish``)."""
        self._discard_shards()

    def _discard_run(self) -> None:
        """Discard an interrupted run: its shards, and the files it left where a stop cut its ``finish`` (an array
        and lists without a sidecar, which after the shards went were read as a bare array, and refused as "not
        written by laic"; deleted first, while the shards still say whose they are)."""
        if not self.sidecar_path.is_file():
            for path in (self.array_path, *self.text_paths, self.stat_path):
                if path is not None:
                    path.unlink(missing_ok=True)
        self._discard_shards()

    def _discard_shards(self) -> None:
        """Delete the shard folder: renamed first, then emptied, so that a stop on the way never leaves shards
        without their run.json (shutil.rmtree deleted run.json among the first files, and the next run took the
        shards it left, another model's or other files' rows, for its own)."""
        doomed = self._doomed_shards()
        if doomed.exists():     # a deletion stopped before: nobody reads it
            shutil.rmtree(doomed)
        if self.shard_dir.exists():
            os.replace(self.shard_dir, doomed)
            shutil.rmtree(doomed)


def _read_shard(path: pathlib.Path) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard's (features of its kept items, kept item indices, skipped item indices)."""
    with np.load(path, allow_pickle=False) as shard:
        return shard["features"], shard["kept"], shard["skipped"]


def _listing_damage(found: Dict) -> Optional[str]:
    """What is wrong with the file lists of an image cache's sidecar ``found`` (None: nothing): its rows are its
    ``files``, and they and its ``skipped`` files are among its ``inputs``, once each."""
    lists = {key: found.get(key) for key in ("inputs", "files", "skipped")}
    bad = [key for key, names in lists.items() if not (isinstance(names, list) and all(isinstance(n, str)
                                                                                        for n in names))]
    if bad:
        return f"its sidecar's {' and '.join(bad)} are not lists of file names"
    if len(lists["files"]) != found.get("rows"):
        return f"its sidecar lists {len(lists['files'])} files for {found.get('rows')} rows"
    listed = lists["files"] + lists["skipped"]
    if len(set(listed)) != len(listed) or not set(listed) <= set(lists["inputs"]):
        return "its sidecar's files and skipped files are not its inputs, once each"
    return None


def earlier_rows_dir(folder: PathLike, stem: str = IMAGE_STEM) -> pathlib.Path:
    """Where an update keeps the rows it took over from interrupted runs until it finishes (EarlierRows)."""
    return pathlib.Path(folder).expanduser() / f".{stem}.earlier"


def shard_progress(folder: PathLike, stem: str = IMAGE_STEM) -> Optional[Tuple[int, int]]:
    """(finished shards, all shards) of the run under way or interrupted in ``folder``; None when there is none."""
    shard_dir = pathlib.Path(folder).expanduser() / f".{stem}.shards"
    try:
        meta = json.loads((shard_dir / "run.json").read_text())
        total = -(-int(meta["n_items"]) // int(meta["shard_size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return len(list(shard_dir.glob("shard_*.npz"))), total


def shard_part(feats: List[np.ndarray], kept, skipped) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard's result; features are [0, 0] when none of its items was readable."""
    features = np.concatenate(feats).astype(np.float32, copy=False) if feats else np.zeros((0, 0), np.float32)
    return features, np.asarray(kept, np.int64).reshape(-1), np.asarray(skipped, np.int64).reshape(-1)


def concat_parts(parts: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]]
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    kept = [k for _, k, _ in parts]
    skipped = [s for _, _, s in parts]
    return shard_part([f for f, _, _ in parts if f.size], np.concatenate(kept) if kept else [],
                 np.concatenate(skipped) if skipped else [])


def read_features(path: PathLike, arg: str = "--features", shard: Optional[Callable[[int], slice]] = None
                  ) -> Tuple[np.ndarray, Optional[Dict]]:
    """Image features [N, D] as LAIC.fit takes them (``laic.inputs.as_tensor``: float32 in C order and native byte
    order, float64 and long double rows each first scaled exactly by a power of two) from a .npy file or a cache
    folder, with that folder's
    sidecar (None for a bare .npy). Errors name ``arg`` (an API argument or a CLI option). ``shard`` (N -> a slice
    of rows, e.g. ``laic.distributed.current().row_shard``): only those rows are read (through a memory map) and
    checked."""
    p, sidecar = _features_file(path, arg)
    features = laic_io.read_npy(p, arg, mmap=shard is not None)
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{arg} {path}: expected a non-empty 2-D array [N, D] of image features, got shape "
                         f"{features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"{arg} {path}: expected floating-point features, got dtype {features.dtype}")
    n_rows, first = len(features), 0
    # Row i is the image sidecar["files"][i]: with another count of rows, no longer.
    said = {"rows": sidecar.get("rows"), "files": len(sidecar.get("files") or [])} if sidecar is not None else {}
    wrong = [f"{n} {what}" for what, n in said.items() if n not in (None, 0, n_rows)]
    if wrong:
        raise ValueError(f"{arg} {path}: the cache is damaged ({p.name} has {n_rows} rows, its sidecar says "
                         f"{' and '.join(wrong)}), so its rows cannot be matched to their images; "
                         f"{REPLACE_IT[IMAGE_STEM]}")
    if shard is not None:
        rows = shard(n_rows)
        features, first = np.array(features[rows]), rows.start
    # A shard counts its own rows only (laic.distributed.failure shows every process's message).
    among = f"{n_rows} row(s)" if shard is None else \
        f"rows {first} to {first + len(features) - 1} (this process's share of {n_rows})"
    if not np.isfinite(features).all():
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1)) + first
        raise ValueError(f"{arg} {path}: {non_finite_rows_message(bad.tolist(), among)}")
    zero = np.flatnonzero(~features.any(axis=1))   # only an exactly zero row has no direction
    if zero.size:
        raise ValueError(f"{arg} {path}: {zero_rows_message((zero + first).tolist(), n_rows, among=among)}")
    # The fit's own copy, made here: the commands hold it through the fit and not also the file's float64 or
    # Fortran-order array beside it (4ND to 8ND bytes more: 5.2 GB of float64 at 1.28M x 512). float64 and long
    # double rows may lie beyond float32's range: each is rescaled exactly, where a cast would make it infinite or
    # zero.
    if not len(features):   # a process's empty share of a few rows: refused by their count, all ranks together
        return np.zeros(features.shape, np.float32), sidecar
    return as_fit_array(arg, features), sidecar


def name_off_its_line(names: Sequence[str]) -> Optional[int]:
    """The index of the first name that is blank or spans lines (None: every name holds a line of its own), as a
    names file (nouns.txt) and :func:`texts_digest` need them: one name a line."""
    # (a line break at the end too: "dog\n".splitlines() is ["dog"], and nouns.txt then held an empty line)
    return next((i for i, name in enumerate(names) if not name.strip() or name.splitlines() != [name]), None)


def names_file_lines(path: PathLike, what: str) -> List[str]:
    """The names a names file (NAMES_FILE) holds as laic writes it: one a line (spaces, blank lines and line endings
    are layout); ``what`` names the file in the error of one that is not UTF-8."""
    return [line.strip() for line in laic_io.read_utf8(path, what).splitlines() if line.strip()]


def recorded_texts(folder: PathLike, sidecar: Dict) -> Optional[List[str]]:
    """The texts a text cache's rows are of, row for row, as its ``sidecar`` records them (since 12-07), else as the
    vocabulary folder's NAMES_FILE beside them lists them (one a line; spaces and blank lines are layout) where they
    are the names the rows were encoded from (its digest); None where neither says (damaged, or edited since)."""
    digest = sidecar.get("inputs_digest")
    texts = sidecar.get("texts")
    if isinstance(texts, list) and all(isinstance(t, str) for t in texts) and texts_digest(texts) == digest:
        return texts
    path = pathlib.Path(folder).expanduser() / NAMES_FILE
    try:
        names = names_file_lines(path, NAMES_FILE) if path.is_file() else []
    except (OSError, ValueError):
        return None
    return names if names and texts_digest(names) == digest else None


def texts_digest(texts: Sequence[str]) -> str:
    """What identifies a list of texts (the names a text cache encodes), recorded in its sidecar."""
    return hashlib.blake2b("\n".join(texts).encode(), digest_size=16).hexdigest()


def _features_file(path: PathLike, arg: str) -> Tuple[pathlib.Path, Optional[Dict]]:
    """The .npy file of ``path`` (a .npy file or a `laic embed` folder) and that folder's sidecar (None for a file).
    A cache's own features.npy, given as a file, is its folder: without the sidecar's list of files a run fitted on
    it named no images, and `laic report` drew no pictures."""
    p = pathlib.Path(path).expanduser()
    if p.is_file() and p.name == f"{IMAGE_STEM}.npy":
        sidecar = laic_sidecar(p.parent / f"{IMAGE_STEM}.json", "image")
        if sidecar is not None:
            return p, sidecar
    if p.is_dir():
        array_path = p / f"{IMAGE_STEM}.npy"
        sidecar_path = p / f"{IMAGE_STEM}.json"
        if not sidecar_path.is_file() and shard_progress(p) is not None:
            # `laic embed` stopped before it wrote its result (or is writing it now), or `laic embed --overwrite`
            # while it wrote it: the rows may be the earlier run's, and without the sidecar nothing says which model
            # or which files they are.
            if laic_io.FolderLock.held_elsewhere(p):
                raise ValueError(f"{arg} {path}: a `laic embed` run is writing this folder now; wait for it to end, "
                                 "then pass it again")
            done, total = shard_progress(p)
            raise ValueError(f"{arg} {path}: a `laic embed` run into this folder was interrupted ({done} of {total} "
                             "shards done) before its result was written; rerun that `laic embed` command (the "
                             "same folder and --out) to finish it")
        if not array_path.is_file():
            raise FileNotFoundError(f"{arg} {path}: the folder has no {array_path.name}; pass a .npy file or a folder "
                                    f"written by `laic embed`")
        return array_path, (_read_record(sidecar_path) if sidecar_path.is_file() else None)
    if not p.exists():
        raise FileNotFoundError(f"{arg} {path}: no such file or folder")
    if not p.is_file():
        raise ValueError(f"{arg} {path}: is not a regular file (a device or a pipe?); pass a .npy file or a folder "
                         "written by `laic embed`")
    return p, None


def laic_sidecar(path: pathlib.Path, kind: str) -> Optional[Dict]:
    """The sidecar at ``path`` of ``kind`` ("image", "text") embeddings, as `laic embed` / `laic vocab` write it, or
    None: absent, unreadable, or a JSON file of that name that laic did not write."""
    try:
        sidecar = laic_io.read_json(path)
    except (OSError, ValueError):
        return None
    return sidecar if isinstance(sidecar, dict) and sidecar.get("kind") == kind and "format" in sidecar else None


# Rows hashed at a time (of float32 D = 512: 64 MiB), read through the memory map.
DIGEST_BLOCK_BYTES = 64 << 20


def features_fingerprint(path: PathLike, arg: str = "--features", byte_order: str = "=") -> Dict[str, object]:
    """What identifies the feature matrix at ``path``: shape, dtype and a SHA-256 of all its values in row order
    (streamed through a memory map: SHA-256 reads 0.7 to 1.7 GB/s on the dev machine). Ranks that read their rows of
    one file compare it, so that a rank given another file (or another version of it: a relative path on another
    machine) stops the fit instead of mixing rows, and run.json records it, so that a report finds out when the file
    has been rewritten since the fit (a few images embedded again included: the digest of 64 sampled rows that runs
    recorded before 12-06 missed them). The values in any file order and byte order: hashed and named in
    ``byte_order`` ("=": this machine's; a big-endian file's bytes and '>f4' were recorded before 12-07, and the
    same values little-endian were refused as other rows)."""
    array = laic_io.read_npy(_features_file(path, arg)[0], arg, mmap=True)
    rows = array.reshape(1) if array.ndim == 0 else array   # (a single number: refused where features are read)
    dtype = in_byte_order(array.dtype, byte_order)
    digest = hashlib.sha256()
    step = max(1, DIGEST_BLOCK_BYTES // max(1, rows[:1].nbytes))
    for start in range(0, len(rows), step):
        digest.update(np.ascontiguousarray(rows[start:start + step], dtype=dtype).data)
    return {"shape": list(array.shape), "dtype": str(dtype), "sha256": digest.hexdigest()}


def in_byte_order(dtype: np.dtype, byte_order: str = "=") -> np.dtype:
    """``dtype`` in ``byte_order`` ("=": this machine's); a dtype without one (bytes, booleans) as it is."""
    return dtype if dtype.byteorder == "|" else dtype.newbyteorder(byte_order)


def features_layout(path: PathLike, arg: str = "--features") -> Tuple[List[int], str]:
    """The shape of the features at ``path`` and their dtype in this machine's byte order, read without their
    values (the first two of their fingerprint)."""
    array = laic_io.read_npy(_features_file(path, arg)[0], arg, mmap=True)
    return list(array.shape), str(in_byte_order(array.dtype))


def fingerprint_matches(path: PathLike, recorded: Dict[str, object], arg: str = "--features") -> bool:
    """Whether the features at ``path`` are those ``recorded`` by :func:`features_fingerprint`, or by the laic of
    runs written before 12-06 (a digest of 64 evenly spaced rows, checked as it was: those runs stay readable)."""
    if "sha256" in recorded:
        # A dtype recorded with its byte order ('>f4'): a run written before 12-07 from a file of another byte
        # order than this machine's, hashed in that order.
        said = str(recorded.get("dtype", ""))
        return features_fingerprint(path, arg, said[0] if said[:1] in (">", "<") else "=") == recorded
    array = laic_io.read_npy(_features_file(path, arg)[0], arg, mmap=True)
    rows = np.unique(np.linspace(0, max(0, len(array) - 1), 64).astype(np.int64))
    sample = np.ascontiguousarray(array[rows]) if len(array) else array
    return recorded == {"shape": list(array.shape), "dtype": str(array.dtype),
                        "digest": hashlib.sha256(sample.tobytes()).hexdigest()[:16]}


def check_same_encoder(image_sidecar: Optional[Dict], text_sidecar: Optional[Dict], images_arg: str = "--features",
                       texts_arg: str = "--vocab") -> None:
    """Image and text embeddings must come from one CLIP model: compare the model, weights digest and layer classes
    that their sidecars record, when both record them."""
    if not image_sidecar or not text_sidecar:
        return
    for key in ("model", "weights_digest", "modules"):
        a, b = image_sidecar.get(key), text_sidecar.get(key)
        if a is not None and b is not None and a != b:
            if key == "modules":
                change = module_change(a, b, f"in {images_arg}", f"in {texts_arg}")
                raise ValueError(f"{images_arg} and {texts_arg} come from the same weights built of other layers "
                                 f"({change}: an open_clip tag such as OpenAI's builds QuickGELU, the same weights "
                                 "from a file GELU); embed both with the weights loaded the same way")
            raise ValueError(f"{images_arg} and {texts_arg} come from different encoders ({key}: {a!r} vs {b!r}); "
                             f"embed both with the same model and weights")
