"""Encode a noun vocabulary with an open_clip text tower, into a folder that `laic fit` reads.

SOURCE: 'wordnet' (WordNet's nouns, read from its database files: /usr/share/wordnet, $WNSEARCHDIR or NLTK's data),
a text file with one name per line, or a folder with nouns.txt. Each name is encoded through a prompt ensemble
(the seven CLIP templates by default), averaged and normalised.

OUT receives embeddings.npy (float32 [M, D]), nouns.txt (the M names in row order) and embeddings.json (model,
weights digest, templates). Running it again reuses the result; an interrupted run resumes.

Examples:
  laic vocab --source wordnet --model ViT-B-32 --pretrained openai --out vocab/wordnet
  laic vocab --source my_nouns.txt --template "a photo of a {}." --model ViT-B-32 --pretrained openai --out vocab/mine
"""
from __future__ import annotations

import argparse
import pathlib

from .embed import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, metavar="wordnet|FILE|DIR",
                        help="'wordnet', a text file with one name per line, or a folder with nouns.txt")
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for embeddings.npy + nouns.txt")
    parser.add_argument("--template", dest="templates", action="append", metavar="TEXT",
                        help="a prompt template with {} for the name (repeatable; default: the seven CLIP templates)")
    parser.add_argument("--batch-size", type=int, default=512, help="prompts per forward pass (default 512)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace embeddings in DIR that were made with another model, templates or names")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .. import io
    from ..embed import SEVEN_TEMPLATES, embed_texts
    from ..runtime import resolve_device
    from ..vocab import NAMES_FILE, load_vocabulary

    resolve_device(args.device, "--device")   # a bad device fails here, naming the option, before any loading
    vocabulary = load_vocabulary(args.source)
    templates = tuple(args.templates) if args.templates else SEVEN_TEMPLATES
    embeddings = embed_texts(vocabulary.names, args.model, args.pretrained, seed=args.seed, templates=templates,
                             cache_dir=args.out, batch_size=args.batch_size, device=args.device,
                             progress=not args.quiet, overwrite=args.overwrite)
    # After the embeddings: a refused or failed run must not have replaced the names of what is already there.
    io.write_text(pathlib.Path(args.out) / NAMES_FILE, "".join(name + "\n" for name in vocabulary.names))
    print(f"{len(vocabulary.names)} nouns from {vocabulary.source} encoded ({embeddings.shape[1]} dims, "
          f"{len(templates)} template(s)) in {args.out}")
    return 0


def interrupted(args) -> str:
    """What Ctrl-C left in OUT (for laic.cli): the encoded shards, which a rerun reuses."""
    from ..embed_cache import TEXT_STEM, shard_progress

    progress = shard_progress(args.out, TEXT_STEM)
    if progress is None:
        return f"interrupted before any noun was encoded; rerun to encode them into {args.out}"
    return f"interrupted after {progress[0]} of {progress[1]} shards; rerun the same command to resume"
