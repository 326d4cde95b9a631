"""The noun vocabulary: WordNet nouns read from WordNet's own database files, a plain text list, or a folder of
precomputed text embeddings with their names (``embeddings.npy`` + ``nouns.txt``, the layout ``laic vocab`` writes).

WordNet's database (``data.noun``; WordNet 3.0 / 3.1, as installed by Debian's ``wordnet-base`` or NLTK's downloader)
is read directly, without NLTK: each synset line is ``offset lex_filenum ss_type w_cnt word lex_id ...``, and the
synset's name is its first word, underscores turned into spaces. WordNet 3.0 has 82,115 noun synsets; their names are
deduplicated in file order by default (a word with many senses, like "bank", is one name: identical prompts would
only give identical rows), as CLIP's text tower reads them (:func:`prompt_key`): its tokenizer cleans the text (ftfy,
HTML entities), lowercases it and collapses white space, so "Advent" and "advent" are one name too (the first
spelling kept; open_clip's multilingual towers, whose tokenizers keep case, lose that distinction). That leaves 67,186
nouns (67,893 distinct spellings). ``dedupe=False`` keeps one row per synset, as the published methods count them.

The word ``wordnet`` (any case) means WordNet's nouns where a source of names is named (``laic vocab --source``,
:func:`wordnet_keyword`); beside a file or folder of that name in the working directory it is refused as ambiguous
(``./wordnet`` is that folder, WordNet's own folder, the one holding data.noun, is WordNet), except where that folder
is the output being made from it (``laic vocab --source wordnet --out wordnet`` run again). Where an embedded
vocabulary is read (``laic fit --vocab``) a folder of that name is the only meaning (:func:`read_embedded_vocabulary`).
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import pathlib
import sys
import unicodedata
import zipfile
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from . import io
from .embed_cache import NAMES_FILE, TEXT_STEM, name_off_its_line, shard_progress, texts_digest
from .inputs import as_fit_array

PathLike = Union[str, os.PathLike]

EMBEDDINGS_FILE = "embeddings.npy"
SIDECAR_FILE = "embeddings.json"


@dataclasses.dataclass
class Vocabulary:
    """``names[i]`` is the noun of ``embeddings[i]`` (float32 [M, D] as encoded, not normalised: the fit normalises
    the rows; a float64 folder's rows each scaled exactly by a power of two first, as LAIC.fit takes them), or
    embeddings is None when the names still need encoding (laic.embed.embed_texts)."""

    names: List[str]
    embeddings: Optional[np.ndarray] = None
    source: str = ""
    sidecar: Optional[Dict] = None  # what `laic vocab` recorded beside the embeddings (model, weights digest, ...)

    def __len__(self) -> int:
        return len(self.names)


# ---------------------------------------------------------------------------------------------------------- WordNet

def _nltk_data_dirs() -> List[pathlib.Path]:
    dirs = [pathlib.Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    dirs.append(pathlib.Path.home() / "nltk_data")
    dirs += [pathlib.Path(sys.prefix, sub) for sub in ("nltk_data", "share/nltk_data", "lib/nltk_data")]
    dirs += [pathlib.Path(p) for p in ("/usr/share/nltk_data", "/usr/local/share/nltk_data", "/usr/lib/nltk_data",
                                       "/usr/local/lib/nltk_data")]
    return dirs


def wordnet_search_dirs() -> List[pathlib.Path]:
    """Where wordnet_nouns() looks, in order: $WNSEARCHDIR alone when it is set (WordNet's own tools look nowhere
    else: a WordNet found elsewhere would be another one than the user named), else the usual system installs, then
    NLTK's data folders."""
    if os.environ.get("WNSEARCHDIR"):
        return [pathlib.Path(os.environ["WNSEARCHDIR"]).expanduser()]
    dirs = [pathlib.Path(p) for p in ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/local/WordNet-3.0/dict",
                                      "/opt/homebrew/share/wordnet")]
    return dirs + _nltk_data_dirs()


WORDNET_SUBFOLDERS = ("", "dict", "corpora/wordnet")   # where a data.noun lies under a WordNet or NLTK folder


def _has_data_noun(folder: pathlib.Path) -> bool:
    """Whether ``folder`` holds a data.noun where _read_data_noun looks (without reading it)."""
    return (any((folder / sub / "data.noun").is_file() for sub in WORDNET_SUBFOLDERS)
            or (folder / "corpora" / "wordnet.zip").is_file())


def _read_data_noun(folder: pathlib.Path) -> Optional[List[str]]:
    """The lines of the data.noun under ``folder`` (itself, dict/, corpora/wordnet/ or NLTK's corpora/wordnet.zip),
    or None when there is none."""
    for sub in WORDNET_SUBFOLDERS:
        candidate = folder / sub / "data.noun"
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace").splitlines()
    archive = folder / "corpora" / "wordnet.zip"
    if archive.is_file():
        with zipfile.ZipFile(archive) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/data.noun") or n == "data.noun"), None)
            if member:
                return zf.read(member).decode("utf-8", errors="replace").splitlines()
    return None


def _fix_text(text: str) -> str:
    """ftfy.fix_text, the first step of open_clip's tokenizer cleaning (NFC, curly quotes straightened, ligatures and
    full-width letters undone, mojibake repaired, ...). Without ftfy (open_clip needs it, so only where no text is
    encoded) Unicode's NFC alone, ftfy's own normalisation: NFKC would merge names the tokenizer keeps apart (x² and
    x2)."""
    try:
        import ftfy
    except ImportError:
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


def prompt_key(name: str) -> str:
    """What CLIP's text tower reads of a name, cleaned as open_clip's tokenizer cleans text (``basic_clean`` then
    ``whitespace_clean``: ftfy.fix_text, HTML entities unescaped twice, white space collapsed, lowercased): two names
    with one key get identical prompts, so identical rows ("café" precomposed or decomposed, "o’clock" and "o'clock";
    a case-keeping multilingual tokenizer would tell "Dog" and "dog" apart)."""
    # Printable ASCII without '&' (all of WordNet) is left alone by ftfy and html.unescape: WordNet's 82k names
    # took 2.7 s more through ftfy.
    if not (name.isascii() and name.isprintable() and "&" not in name):
        name = html.unescape(html.unescape(_fix_text(name)))
    return " ".join(name.split()).lower()


def parse_data_noun(lines: Iterable[str], source: str = "data.noun", dedupe: bool = True) -> List[str]:
    """One name per noun synset (its first word, underscores to spaces), deduplicated in file order unless told
    otherwise."""
    names, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith(" "):  # the licence header lines start with spaces
            continue
        fields = line.split(" ", 6)
        if len(fields) < 6 or not (fields[0].isdigit() and len(fields[0]) == 8) or fields[2] != "n":
            raise ValueError(f"{source} is not a WordNet noun data file (line {number}: {line[:60]!r}); "
                             f"point the search at a WordNet 'dict' folder holding index.noun and data.noun")
        name = fields[4].replace("_", " ")
        if not dedupe or prompt_key(name) not in seen:
            seen.add(prompt_key(name))
            names.append(name)
    if not names:
        raise ValueError(f"{source} holds no noun synsets; it is not a WordNet noun data file")
    return names


def wordnet_nouns(search_dir: Optional[PathLike] = None, dedupe: bool = True) -> List[str]:
    """WordNet's nouns (see the module doc). ``search_dir``: a folder holding data.noun (or an NLTK data folder);
    without it, the folders of wordnet_search_dirs() are tried in order ($WNSEARCHDIR alone when set: one without
    WordNet is an error naming it)."""
    if search_dir is not None:
        folder = pathlib.Path(search_dir).expanduser()
        lines = _read_data_noun(folder)
        if lines is None:
            raise ValueError(f"search_dir {str(folder)!r} holds no WordNet data.noun (nor dict/, corpora/wordnet/ or "
                             f"corpora/wordnet.zip); pass the folder holding index.noun and data.noun")
        return parse_data_noun(lines, str(folder), dedupe)
    looked = wordnet_search_dirs()
    for folder in looked:
        lines = _read_data_noun(folder)
        if lines is not None:
            return parse_data_noun(lines, str(folder), dedupe)
    if os.environ.get("WNSEARCHDIR"):
        raise FileNotFoundError(
            f"WNSEARCHDIR={os.environ['WNSEARCHDIR']} holds no WordNet data.noun (nor dict/, corpora/wordnet/ or "
            "corpora/wordnet.zip); set it to the folder holding index.noun and data.noun, or unset it to search the "
            "usual places (/usr/share/wordnet, NLTK's data folders)")
    raise FileNotFoundError(
        "no WordNet database found (looked for data.noun in " + ", ".join(str(p) for p in looked) + "); get one with "
        "`apt-get install wordnet-base` (Debian/Ubuntu, into /usr/share/wordnet) or "
        "`python -m nltk.downloader wordnet` (into ~/nltk_data), or set WNSEARCHDIR to a folder holding data.noun")


# ------------------------------------------------------------------------------------------------ other sources

WORDNET_POS = ("n", "v", "a", "s", "r")   # noun, verb, adjective, adjective satellite (data.adj only), adverb


def _looks_like_wordnet(line: str) -> bool:
    """A line of one of WordNet's database files, of any part of speech: data.* ('offset lex_filenum ss_type ...',
    an 8-digit offset) or index.* ('lemma pos synset_cnt p_cnt ...')."""
    fields = line.split()
    return len(fields) >= 4 and ((len(fields[0]) == 8 and fields[0].isdigit() and fields[2] in WORDNET_POS)
                                 or (fields[1] in WORDNET_POS and fields[2].isdigit() and fields[3].isdigit()))


def read_names(path: PathLike) -> List[str]:
    """A plain text list: one name per line; blank lines and lines starting with '#' are left out; duplicates (as the
    text tower reads them: :func:`prompt_key`) are dropped, the first kept, so names and rows stay one-to-one. WordNet's own files are refused (their records would
    become names): pass their folder."""
    names, seen = [], set()
    text = io.read_utf8(path, "vocabulary file")
    _refuse_json(path, text)
    lines = text.splitlines()
    records = [line for line in lines if line.strip() and not line.startswith(" ")][:20]
    if records and sum(map(_looks_like_wordnet, records)) > len(records) // 2:
        raise ValueError(f"{str(path)!r} is a WordNet database file, not a list of names; pass the folder that holds "
                         f"it ({str(pathlib.Path(path).parent)!r}) or 'wordnet'")
    dropped = []
    for line in lines:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if prompt_key(name) in seen:
            dropped.append(name)
        else:
            seen.add(prompt_key(name))
            names.append(name)
    if not names:
        raise ValueError(f"vocabulary file {str(path)!r} holds no names; write one name per line")
    _refuse_a_list_or_a_table(path, names)
    if dropped:
        from .runtime import warn_at_caller

        warn_at_caller(f"vocabulary file {str(path)!r}: left out {len(dropped)} name(s) that the text encoder reads "
                       f"as an earlier one (case, accents' forms, HTML entities and spaces aside): "
                       f"{', '.join(shown_name(n) for n in dropped[:3])}{', ...' if len(dropped) > 3 else ''}")
    return names


# Separators of values that a file of names holds on one line instead of one a line (a comma list), or in columns
# (a CSV or TSV table).
LIST_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab"}
LIST_ON_ONE_LINE = 5   # values on the one line of a file that make it a list rather than a name ("Washington, D.C.")


def _refuse_json(path: PathLike, text: str) -> None:
    """A JSON list or object of names (one line or pretty-printed) would be read as names such as '["cat",'."""
    if text.lstrip()[:1] not in ("[", "{"):
        return
    try:
        parsed = json.loads(text)
    except ValueError:
        return
    if isinstance(parsed, (list, dict)):
        raise ValueError(f"vocabulary file {str(path)!r} is JSON (a {'list' if isinstance(parsed, list) else 'object'}"
                         "); laic reads plain text, one name a line: write the names out one a line")


def _refuse_a_list_or_a_table(path: PathLike, names: Sequence[str]) -> None:
    """A file whose one line is a list ("cat, dog, bird, ...": a JSON list of 2,000 names was one 23 KB "noun",
    fitted without a word), or whose every line splits into as many fields (a CSV "cat,3", a TSV), was read as one
    name a line. Names with a comma stay names: "Washington, D.C., USA" alone, "Paris, France" a line, "tench, Tinca
    tinca" (comma and space: no CSV writes that)."""
    for separator, word in LIST_SEPARATORS.items():
        if len(names) == 1:
            values = len(names[0].split(separator))
            if values >= LIST_ON_ONE_LINE:
                raise ValueError(f"vocabulary file {str(path)!r}: its one line holds {values} {word}-separated "
                                 f"values ({shown_name(names[0])}); laic reads one name a line: write each on a "
                                 "line of its own")
            continue
        fields = {len(name.split(separator)) for name in names}
        spaced = separator == "," and any(", " in name for name in names)
        if len(fields) == 1 and min(fields) >= 2 and not spaced:
            raise ValueError(f"vocabulary file {str(path)!r}: every line holds {min(fields)} {word}-separated "
                             f"fields, as a table does ({shown_name(names[0])}); laic reads each whole line as a "
                             "name: keep only the names' column")


def shown_name(name: str, limit: int = 60) -> str:
    """``repr`` of a name for a message, cut at ``limit`` characters (a 5 MB line was quoted whole)."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name):,} characters)"


def write_names(folder: PathLike, names: Sequence[str]) -> None:
    """``folder/nouns.txt`` as laic writes it (atomically): one name a line, the rows of embeddings.npy in order."""
    io.write_text(pathlib.Path(folder).expanduser() / NAMES_FILE, io.lines_text(names))


def write_folder(folder: PathLike, embeddings: np.ndarray, names: Sequence[str]) -> None:
    """A vocabulary folder from embeddings already computed (``laic demo --save-data``): embeddings.npy and
    nouns.txt, without the sidecar that `laic vocab` adds (it describes an encoder, which such rows have none of)."""
    if len(embeddings) != len(names):
        raise ValueError(f"{len(embeddings)} embedding rows for {len(names)} names; one row per name")
    broken = name_off_its_line(names)
    if broken is not None:   # (nouns.txt holds a name a line: the folder would not read back)
        raise ValueError(f"names[{broken}] = {names[broken]!r} is blank or spans lines; one name a line")
    padded = next((i for i, name in enumerate(names) if name != name.strip()), None)
    if padded is not None:   # (the reader strips each line of nouns.txt: the name would change)
        raise ValueError(f"names[{padded}] = {names[padded]!r} has white space at an end, which {NAMES_FILE} does "
                         "not keep; strip the names")
    io.save_npy(pathlib.Path(folder).expanduser() / EMBEDDINGS_FILE, embeddings)
    write_names(folder, names)


def _rows_and_names(rows: np.ndarray, names: List[str], shown: int = 10) -> str:
    """``"row 3 ('dog'), row 7 ('cat')"``, the first ``shown`` of ``rows``."""
    said = ", ".join(f"row {i} ({names[i]!r})" for i in rows[:shown])
    return said + (", ..." if len(rows) > shown else "")


def _read_embedded_folder(folder: pathlib.Path) -> Vocabulary:
    """Precomputed embeddings with names, one row a name in the file's order (no deduplication), as LAIC.fit takes
    them (float32; a float64 row scaled exactly by a power of two first)."""
    names = [line.strip() for line in io.read_utf8(folder / NAMES_FILE, "names file").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"vocabulary folder {str(folder)!r}: {NAMES_FILE} holds no names; write one name per line")
    sidecar_path = folder / SIDECAR_FILE
    sidecar = io.read_json(sidecar_path) if sidecar_path.is_file() else None
    # `laic vocab --overwrite` interrupted after the new embeddings but before their sidecar or the names leaves new
    # rows beside the old names: they would name the clusters with other nouns than the rows encode. Said before the
    # rows are counted (names and rows of other counts were said to differ, without the way out).
    interrupted = sidecar is None and shard_progress(folder, TEXT_STEM) is not None
    if interrupted or (sidecar and sidecar.get("inputs_digest") not in (None, texts_digest(names))):
        raise ValueError(f"vocabulary folder {str(folder)!r}: {NAMES_FILE} does not hold the names {EMBEDDINGS_FILE} "
                         "was encoded from (a `laic vocab` run into it was interrupted, or nouns.txt was edited); "
                         "rerun that `laic vocab` command (the same --source and --out), or put back the names it "
                         "wrote")
    embeddings = io.read_npy(folder / EMBEDDINGS_FILE, "vocabulary file")
    if embeddings.ndim != 2:
        raise ValueError(f"vocabulary folder {str(folder)!r}: {EMBEDDINGS_FILE} has shape {embeddings.shape}; it "
                         "must be 2-D, one row of D values per name")
    if embeddings.shape[0] != len(names):
        raise ValueError(f"vocabulary folder {str(folder)!r}: {EMBEDDINGS_FILE} has shape {embeddings.shape} but "
                         f"{NAMES_FILE} has {len(names)} names; they must have one row per name")
    if not all(names):
        raise ValueError(f"vocabulary folder {str(folder)!r}: {NAMES_FILE} has blank names; write one name per line")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"vocabulary folder {str(folder)!r}: {EMBEDDINGS_FILE} holds {embeddings.dtype} values; "
                         "expected floating-point embeddings (as `laic vocab` writes them)")
    # Checked as they are: float64 and long double rows may lie beyond float32's range, where a cast made them
    # infinite or zero (rows of 1e300 or 1e-50 were refused that LAIC.fit takes); returned as LAIC.fit takes them.
    # The rows named, with their nouns (it said "has all-zero rows", and which of 82k nouns was left to find).
    broken = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if len(broken):
        raise ValueError(f"vocabulary folder {str(folder)!r}: {EMBEDDINGS_FILE} holds NaN or infinite values in "
                         f"{len(broken)} of {len(names)} rows: {_rows_and_names(broken, names)}; encode those nouns "
                         "again (laic vocab --overwrite) or drop them")
    zero = np.flatnonzero(~embeddings.any(axis=1))
    if len(zero):
        raise ValueError(f"vocabulary folder {str(folder)!r}: {EMBEDDINGS_FILE} has all-zero rows, {len(zero)} of "
                         f"{len(names)}: {_rows_and_names(zero, names)}; they point nowhere: encode those nouns "
                         "again (laic vocab --overwrite) or drop them")
    # As LAIC.fit takes them (laic.inputs.as_tensor: float32 in C order, each float64 row first scaled exactly by a
    # power of two), as read_features returns --features: the command holds this one copy through the fit. Not
    # normalised here: the fit normalises every row it uses, so `laic fit --vocab DIR` and LAIC.fit on the arrays of
    # DIR see the same values (a normalisation here moved them by 1 ulp, and the fit clustered differently).
    return Vocabulary(names, as_fit_array("the vocabulary's embeddings", embeddings, items="nouns"), str(folder),
                      sidecar)


def _wordnet_folder() -> Optional[pathlib.Path]:
    """The folder where the word ``wordnet`` finds WordNet now (None: nowhere)."""
    return next((folder for folder in wordnet_search_dirs() if _has_data_noun(folder)), None)


def is_wordnet_word(source: Union[str, PathLike]) -> bool:
    """Whether ``source`` is the word ``wordnet`` (any case; a str, not a path object)."""
    return isinstance(source, str) and source.lower() == "wordnet"


def wordnet_keyword(source: Union[str, PathLike], written_to: Optional[PathLike] = None) -> bool:
    """Whether ``source`` is the word ``wordnet`` (any case: a str, not a path object), which means WordNet's nouns
    (wordnet_nouns) wherever a source of names is named. Beside a file or folder of that name in the working directory
    it is ambiguous (one command read the folder, another WordNet): refused, saying how to spell each; but not where
    that folder is ``written_to``, the output being made from it (`laic vocab --source wordnet --out wordnet` run
    again, to resume or overwrite)."""
    if not is_wordnet_word(source):
        return False
    if written_to is not None and os.path.lexists(source) and \
            os.path.realpath(source) == os.path.realpath(os.path.expanduser(written_to)):
        return True
    if os.path.lexists(source):
        found = _wordnet_folder()
        wordnet = (f"WordNet's own folder ({str(found)!r})" if found is not None else
                   "WordNet's own folder (the one holding data.noun, e.g. /usr/share/wordnet)")
        kind = "folder" if os.path.isdir(source) else "file"
        raise ValueError(f"{source!r} is ambiguous: the word means WordNet's nouns, and the working directory holds a "
                         f"{kind} named {source!r}; pass './{source}' for the {kind}, or {wordnet} for WordNet")
    return True


def _embeddings_file_given(path: pathlib.Path) -> ValueError:
    return ValueError(f"{str(path)!r} is the embeddings file of a vocabulary folder: pass the folder that holds it "
                      f"and {NAMES_FILE} ({str(path.parent)!r})")


def load_vocabulary(source: Union[str, PathLike]) -> Vocabulary:
    """``source``: ``"wordnet"`` (found as in wordnet_nouns; refused beside a file or folder of that name: see
    wordnet_keyword), a folder with ``embeddings.npy`` + ``nouns.txt``, a WordNet folder (data.noun), a folder with
    only ``nouns.txt``, or a text file with one name per line."""
    if wordnet_keyword(source):
        return Vocabulary(wordnet_nouns(), None, "wordnet")
    path = pathlib.Path(source).expanduser()
    how = ("pass 'wordnet', a text file with one name per line, or a folder with embeddings.npy + nouns.txt "
           "(as written by `laic vocab`)")
    if path.is_file() and path.name == EMBEDDINGS_FILE:
        raise _embeddings_file_given(path)
    if path.is_file():
        return Vocabulary(read_names(path), None, str(path))
    if not path.is_dir():
        raise ValueError(f"vocabulary source {str(path)!r} does not exist; {how}")
    if (path / NAMES_FILE).is_file() and (path / EMBEDDINGS_FILE).is_file():
        return _read_embedded_folder(path)
    lines = _read_data_noun(path)
    if lines is not None:
        return Vocabulary(parse_data_noun(lines, str(path)), None, str(path))
    if (path / NAMES_FILE).is_file():
        return Vocabulary(read_names(path / NAMES_FILE), None, str(path))
    raise ValueError(f"vocabulary folder {str(path)!r} holds neither nouns.txt nor a WordNet data.noun; {how}")


def read_embedded_vocabulary(source: Union[str, PathLike], arg: str = "--vocab") -> Vocabulary:
    """A vocabulary that has embeddings (a folder as `laic vocab` writes); errors name ``arg``. Names without
    embeddings (the word wordnet, a text file, a folder of names or WordNet's) are refused before they are read,
    saying how to encode them: `laic fit --vocab wordnet` sent a user to install WordNet first, then refused it. The
    word wordnet is a folder of that name where there is one (WordNet itself has no embeddings to take)."""
    how = f"{arg} takes a folder with {EMBEDDINGS_FILE} + {NAMES_FILE}, as `laic vocab --out DIR` writes"
    def not_encoded(what: str) -> ValueError:
        return ValueError(f"{what} without embeddings: encode them first with `laic vocab --source {source} --model "
                          f"... --out DIR` and pass {arg} DIR")

    try:
        path = pathlib.Path(source).expanduser()
        # WordNet has no embeddings: the word can only mean a folder of that name here (one `laic vocab --out
        # wordnet` wrote), and without one it says how to encode WordNet.
        if is_wordnet_word(source) and not os.path.lexists(source):
            raise not_encoded("WordNet's nouns")
        if path.is_file() and path.name == EMBEDDINGS_FILE:
            raise _embeddings_file_given(path)
        if path.is_file():
            if path.suffix.lower() == ".npy":
                raise ValueError(f"an array alone, whose rows have no names; {how}")
            raise not_encoded("a file of names")
        if path.is_dir() and not (path / EMBEDDINGS_FILE).is_file():
            if (path / NAMES_FILE).is_file() or _has_data_noun(path):
                raise not_encoded("a folder of names")
            raise ValueError(f"the folder holds no {EMBEDDINGS_FILE} and {NAMES_FILE}; {how}")
        if path.is_dir() and not (path / NAMES_FILE).is_file():
            raise ValueError(f"the folder holds {EMBEDDINGS_FILE} but no {NAMES_FILE} (the names of its rows); {how}")
        if not path.exists():
            raise ValueError(f"no such folder; {how}")
        vocab = _read_embedded_folder(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{arg} {source}: {exc}") from None
    except ValueError as exc:   # UnicodeDecodeError too, which cannot be rebuilt from a message
        raise ValueError(f"{arg} {source}: {exc}") from None
    return vocab


def encode_vocabulary(vocabulary: Vocabulary, model_name: str, pretrained: Optional[str] = None,
                      **embed_options) -> Vocabulary:
    """The vocabulary with its names encoded by the text tower (laic.embed.embed_texts: prompt ensemble, cache)."""
    from .embed import embed_texts

    embeddings = embed_texts(vocabulary.names, model_name, pretrained, **embed_options)
    return Vocabulary(list(vocabulary.names), embeddings, vocabulary.source)
