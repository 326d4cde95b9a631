"""Encode a noun vocabulary with an open_clip text tower, into a folder that `laic fit` reads.

SOURCE: 'wordnet' (WordNet's nouns, read from its database files: $WNSEARCHDIR when set, else /usr/share/wordnet or
NLTK's data), a text file with one name per line, or a folder with nouns.txt. The word 'wordnet' means WordNet; beside
a file or folder named wordnet in the working directory (other than OUT itself, run again) it is refused as ambiguous:
pass ./wordnet for that folder, or WordNet's own folder (the one holding data.noun) for WordNet. Each name is encoded
through a prompt ensemble (the seven CLIP templates by default), averaged and normalised.

OUT receives embeddings.npy (float32 [M, D]), nouns.txt (the M names in row order) and embeddings.json (model,
weights digest, templates, the names). Running it again reuses the result; an interrupted run resumes. After names
were added to or removed from the source, --update encodes only the names added and keeps the others' rows (also
those an interrupted run of the list before the edit encoded).

Examples:
  laic vocab --source wordnet --model ViT-B-32 --pretrained openai --out vocab/wordnet
  laic vocab --source my_nouns.txt --template "a photo of a {}." --model ViT-B-32 --pretrained openai --out vocab/mine
  laic vocab --source my_nouns.txt --template "a photo of a {}." --model ViT-B-32 --pretrained openai --out vocab/mine \\
      --update   # after editing my_nouns.txt
"""
from __future__ import annotations

import argparse
import pathlib

from .common import check_seed, file_stamp, int_at_least
from .embed import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, metavar="wordnet|FILE|DIR",
                        help="'wordnet' (WordNet's nouns; refused beside a folder named wordnet other than --out: "
                             "pass ./wordnet for the folder, WordNet's own folder, e.g. /usr/share/wordnet, for "
                             "WordNet), a UTF-8 text "
                             "file with one name per line ('#' lines, blank lines and names the text tower reads as "
                             "one, e.g. 'Dog' and 'dog', left out: the first kept), or a folder with nouns.txt")
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for embeddings.npy + nouns.txt")
    parser.add_argument("--template", dest="templates", action="append", metavar="TEXT",
                        help="a prompt template with {} for the name (repeatable; default: the seven CLIP templates)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=512,
                        help="prompts per forward pass (default 512; raised to one name's templates where smaller)")
    replace = parser.add_mutually_exclusive_group()
    replace.add_argument("--overwrite", action="store_true",
                         help="encode the names again, replacing embeddings in DIR (made with another model, "
                              "templates or names, or the same)")
    replace.add_argument("--update", action="store_true",
                         help="DIR holds embeddings of other names, made with the same model and templates: encode "
                              "only the names added since, keep the rows of the others (in the new order)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _names(source: str, out: pathlib.Path):
    """(names, where they came from): the word 'wordnet' is WordNet (checked first, so that a folder of that name
    other than ``out`` is refused as ambiguous instead of read: laic.vocab.wordnet_keyword); a folder's nouns.txt is
    read as a list of names (its embeddings, if any, are to be replaced: they need not match names edited since);
    anything else as load_vocabulary reads it."""
    from ..vocab import NAMES_FILE, load_vocabulary, read_names, wordnet_keyword, wordnet_nouns

    try:
        keyword = wordnet_keyword(source, written_to=out)   # (its own output folder: a rerun, not a folder read)
    except ValueError as exc:
        raise ValueError(f"--source {source}: {exc}") from None
    if keyword:
        return wordnet_nouns(), "wordnet"
    folder = pathlib.Path(source).expanduser()
    if folder.is_dir() and (folder / NAMES_FILE).is_file():
        return read_names(folder / NAMES_FILE), str(folder)
    vocabulary = load_vocabulary(source)
    return vocabulary.names, vocabulary.source


def _check_names_file(out: pathlib.Path, source: str, names, overwrite: bool) -> None:
    """A nouns.txt in OUT that laic did not write (no embeddings.json, no run under way beside it) is someone's list:
    replaced only with --overwrite. So is the --source being encoded in place, where the names written would change
    it (its comments and repeated names dropped: the folder's nouns.txt is read line for line)."""
    from ..embed_cache import TEXT_STEM, names_file_lines
    from ..vocab import NAMES_FILE

    path = out / NAMES_FILE
    ours = (out / f"{TEXT_STEM}.json").exists() or (out / f".{TEXT_STEM}.shards").exists()
    in_place = pathlib.Path(source).expanduser().resolve() in (out.resolve(), path.resolve())
    if overwrite or not path.is_file():
        return
    # Its lines as names (spaces, blank lines and line endings are layout): what would the rewrite drop?
    lines = names_file_lines(path, "--source") if in_place else []
    if in_place and lines != names:
        raise ValueError(f"--source {source}: is the {NAMES_FILE} of --out, which laic rewrites as the names it "
                         "encodes, one per line (without its comments and repeated names); pass --overwrite to let "
                         "it, or keep your list elsewhere and pass that file as --source")
    if not ours and not in_place:
        raise ValueError(f"--out {out}: holds a {NAMES_FILE} not written by laic (no {TEXT_STEM}.json beside "
                         "it); pass --overwrite to replace it, or choose another folder")


def _names_change(out: pathlib.Path, names) -> str:
    """How ``names`` differ from those of laic's embeddings in OUT ("3 added (a, b, c), 1 removed (d)", "the same
    names in another order"); "" where they are the same, or where nothing in OUT says their names (absent,
    damaged, not laic's, or a nouns.txt that is not theirs: a run cut before it wrote them is the cache's to say)."""
    from ..embed_cache import TEXT_STEM, laic_sidecar, recorded_texts, texts_digest
    from ..vocab import shown_name

    sidecar = laic_sidecar(out / f"{TEXT_STEM}.json", "text")
    if sidecar is None or sidecar.get("inputs_digest") in (None, texts_digest(names)):
        return ""
    earlier = recorded_texts(out, sidecar)
    if earlier is None:
        return ""
    before, now = set(earlier), set(names)
    added = [name for name in names if name not in before]
    removed = [name for name in earlier if name not in now]

    def some(found):
        return f" ({', '.join(map(shown_name, found[:3]))}{', ...' if len(found) > 3 else ''})" if found else ""

    return (f"{len(added)} added{some(added)}, {len(removed)} removed{some(removed)}" if added or removed
            else "the same names in another order")


def _refuse_other_names(out: pathlib.Path, names, args, templates) -> None:
    """OUT holding laic's embeddings of other names is refused (by laic.embed_cache: "it differs in the texts",
    naming none of them): said here with the names added and removed, before the model is loaded; --update offered
    where the embeddings were made with the same model and templates (an update of others is refused)."""
    from ..embed_cache import TEXT_STEM, laic_sidecar

    change = "" if args.overwrite or args.update else _names_change(out, names)
    if not change:
        return
    sidecar = laic_sidecar(out / f"{TEXT_STEM}.json", "text") or {}
    alike = sidecar.get("model") == args.model and sidecar.get("templates") == list(templates)
    how = ("pass --update to encode only the names added, --overwrite to encode them all again" if alike
           else "pass --overwrite to encode these names there (made with another model or templates, none of its "
                "rows can be kept)")
    raise ValueError(f"--out {out}: holds the embeddings of other names than these ({change}); {how}, or choose "
                     "another folder")


def run(args) -> int:
    from ..clip import check_model_name
    from ..embed import SEVEN_TEMPLATES, embed_texts
    from ..embed_cache import TEXT_STEM
    from ..runtime import resolve_device
    from ..vocab import NAMES_FILE, write_names

    resolve_device(args.device, "--device")   # a bad device fails here, naming the option, before any loading
    check_seed(args.seed)
    check_model_name(args.model, "--model")   # (one process: torchrun refuses `laic vocab`)
    out = pathlib.Path(args.out).expanduser()
    names, source = _names(args.source, out)
    templates = tuple(args.templates) if args.templates else SEVEN_TEMPLATES
    _check_names_file(out, args.source, names, args.overwrite)
    _refuse_other_names(out, names, args, templates)
    change = _names_change(out, names) if args.update else ""
    sidecar = out / f"{TEXT_STEM}.json"
    args.sidecar_before = before = file_stamp(sidecar)   # interrupted(): written by this run, or an earlier one's
    embeddings = embed_texts(names, args.model, args.pretrained, seed=args.seed, templates=templates,
                             cache_dir=out, batch_size=args.batch_size, device=args.device,
                             progress=not args.quiet, overwrite=args.overwrite, update=args.update,
                             names_file=NAMES_FILE)     # moved in with the rows they name
    args.encoded = True   # what Ctrl-C left: interrupted()
    # After the embeddings (a refused or failed run must not have replaced the names of what is already there), for
    # a reused cache: the names of one written before its names were moved in with it.
    write_names(out, names)
    how = "reused" if before is not None and file_stamp(sidecar) == before else "encoded"
    if change and how == "encoded":
        how = f"updated ({change}; every other row kept)"
    print(f"{len(names)} noun{'s' if len(names) != 1 else ''} from {source} {how} ({embeddings.shape[1]} dims, "
          f"{len(templates)} template(s)) in {out}")
    return 0


def interrupted(args) -> str:
    """What Ctrl-C left in OUT (for laic.cli): the encoded shards, which a rerun reuses."""
    from ..embed_cache import NAMES_FILE, TEXT_STEM, earlier_rows_dir, shard_progress

    progress = shard_progress(args.out, TEXT_STEM)
    if progress is not None:
        return f"interrupted after {progress[0]} of {progress[1]} shards; rerun the same command to resume"
    if earlier_rows_dir(args.out, TEXT_STEM).is_dir():   # an update stopped as it took a run over
        return "interrupted; the rows it took over from the interrupted run are kept: rerun with --update to go on"
    # The sidecar is written last: one this run wrote (a stop while its shards were deleted said "before any noun";
    # an earlier run's, kept until then, is no sign of this one's).
    sidecar = pathlib.Path(args.out).expanduser() / f"{TEXT_STEM}.json"
    if file_stamp(sidecar) not in (None, getattr(args, "sidecar_before", None)):   # (nouns.txt moved in with it)
        return f"interrupted; the vocabulary in {args.out} is finished (its embeddings and {NAMES_FILE})"
    if getattr(args, "encoded", False):     # reused: its names rewritten after
        return (f"interrupted; the embeddings in {args.out} are finished (its nouns.txt may not be yet): rerun the "
                "same command, which only writes the names")
    return f"interrupted before any noun was encoded; rerun to encode them into {args.out}"
