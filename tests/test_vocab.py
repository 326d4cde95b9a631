"""laic.vocab: WordNet's database format (hand-written files in the documented layout, and the real database when
installed), plain lists, precomputed folders, and the `laic vocab` command with the tiny CLIP of tests/tiny_clip.py."""
import contextlib
import json
import pathlib
import re
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from laic import clip as C
from laic import vocab as V
from laic.cli import main as cli_main
from tiny_clip import register_tiny_clip

# The layout of WordNet 3.0's data.noun (wndb(5WN)): licence lines start with two spaces; then per synset
# "offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt [pointers] | gloss".
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 | that which is perceived
00001930 03 n 01 physical_entity 0 007 @ 00001740 n 0000 ~ 00002452 n 0000 | an entity that has physical existence
08420278 14 n 03 bank 0 depository_financial_institution 0 banking_concern 0 002 @ 08420278 n 0000 | a bank
09213565 17 n 01 bank 0 001 @ 09433952 n 0000 | sloping land (especially the slope beside a body of water)
07616046 13 n 02 ice_cream 0 icecream 0 001 @ 07612996 n 0000 | frozen dessert
02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis
"""
INDEX_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
bank n 2 1 @ 2 2 08420278 09213565
dog n 1 1 @ 1 1 02084071
entity n 1 1 ~ 1 1 00001740
ice_cream n 1 1 @ 1 0 07616046
physical_entity n 1 1 @ 1 0 00001930
"""
EXPECTED = ["entity", "physical entity", "bank", "ice cream", "dog"]


def write_wordnet(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.noun").write_text(DATA_NOUN)
    (folder / "index.noun").write_text(INDEX_NOUN)
    return folder


def test_wordnet_database_files_are_parsed(tmp_path):
    folder = write_wordnet(tmp_path / "dict")
    assert V.wordnet_nouns(folder) == EXPECTED
    assert V.wordnet_nouns(folder, dedupe=False) == EXPECTED[:3] + ["bank"] + EXPECTED[3:]
    # Every synset offset listed in index.noun is a synset line of data.noun: the sample is self-consistent.
    offsets = {line.split()[0] for line in DATA_NOUN.splitlines() if not line.startswith(" ")}
    assert {o for line in INDEX_NOUN.splitlines()[1:] for o in line.split()[-int(line.split()[2]):]} == offsets


def test_wordnet_is_found_via_wnsearchdir_and_nltk_layouts(tmp_path, monkeypatch):
    monkeypatch.setattr(V, "wordnet_search_dirs", lambda: [tmp_path / "absent", tmp_path / "wn"])
    write_wordnet(tmp_path / "wn")
    assert V.wordnet_nouns() == EXPECTED
    assert V.load_vocabulary("wordnet").names == EXPECTED
    monkeypatch.undo()

    monkeypatch.setenv("WNSEARCHDIR", str(write_wordnet(tmp_path / "env")))
    assert V.wordnet_search_dirs()[0] == tmp_path / "env"
    assert V.wordnet_nouns() == EXPECTED

    nltk_data = tmp_path / "nltk_data"
    write_wordnet(nltk_data / "corpora" / "wordnet")
    assert V.wordnet_nouns(nltk_data) == EXPECTED
    zipped = tmp_path / "nltk_zip"
    (zipped / "corpora").mkdir(parents=True)
    with zipfile.ZipFile(zipped / "corpora" / "wordnet.zip", "w") as zf:
        zf.writestr("wordnet/data.noun", DATA_NOUN)
        zf.writestr("wordnet/index.noun", INDEX_NOUN)
    monkeypatch.delenv("WNSEARCHDIR")   # when set, the one place looked in
    monkeypatch.setenv("NLTK_DATA", str(zipped))
    assert zipped in V.wordnet_search_dirs()
    assert V.wordnet_nouns(zipped) == EXPECTED


def test_missing_wordnet_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(V, "wordnet_search_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(FileNotFoundError) as info:
        V.wordnet_nouns()
    message = str(info.value)
    assert str(tmp_path / "a") in message and str(tmp_path / "b") in message
    assert "apt-get install wordnet-base" in message and "nltk" in message
    with pytest.raises(ValueError, match="holds no WordNet data.noun"):
        V.wordnet_nouns(tmp_path)


def test_a_file_that_is_not_wordnet_is_rejected(tmp_path):
    (tmp_path / "data.noun").write_text("hello world\n")
    with pytest.raises(ValueError, match="not a WordNet noun data file"):
        V.wordnet_nouns(tmp_path)


@pytest.mark.skipif(not pathlib.Path("/usr/share/wordnet/data.noun").is_file(),
                    reason="WordNet not installed (apt-get install wordnet-base)")
def test_real_wordnet_has_one_name_per_noun_synset():
    lines = pathlib.Path("/usr/share/wordnet/data.noun").read_text(errors="replace").splitlines()
    synsets = [line for line in lines if line and not line.startswith(" ")]
    per_synset = V.wordnet_nouns("/usr/share/wordnet", dedupe=False)
    assert len(per_synset) == len(synsets) > 80000  # WordNet 3.0: 82,115
    names = V.wordnet_nouns("/usr/share/wordnet")
    # One name per prompt the text tower reads (the first spelling): "Advent" and "advent" were two identical rows.
    first = {}
    for name in per_synset:
        first.setdefault(" ".join(name.split()).lower(), name)
    assert names == list(first.values()) and names[0] == "entity"
    assert len(names) < len(set(per_synset))     # 67,186 against 67,893 spellings in WordNet 3.0
    assert all("_" not in n for n in names) and "physical entity" in names


def test_plain_list_and_precomputed_folder(tmp_path, shared_data):
    listing = tmp_path / "nouns.txt"
    # A byte-order mark (Windows editors write one) is not part of the first name; names the text tower reads as
    # one (case, inner white space) are one row.
    listing.write_text("\ufeff# my nouns\ndog\n\n  cat  \ndog\nhot dog\nDog\nhot   Dog\n", encoding="utf-8")
    vocab = V.load_vocabulary(listing)
    assert vocab.names == ["dog", "cat", "hot dog"] and vocab.embeddings is None

    vocab = V.load_vocabulary(shared_data / "vocab")
    raw = np.load(shared_data / "vocab" / "embeddings.npy").astype(np.float32)
    names = (shared_data / "vocab" / "nouns.txt").read_text().splitlines()
    assert vocab.names == names and len(vocab) == raw.shape[0] == 1403
    assert vocab.embeddings.dtype == np.float32
    # The file's values exactly (the fit normalises): `laic fit --vocab DIR` and LAIC.fit(np.load(...)) agree.
    np.testing.assert_array_equal(vocab.embeddings, raw)


@pytest.mark.parametrize("dtype", [np.float64, np.longdouble])
def test_a_folder_of_rows_beyond_float32_reads_as_laic_fit_takes_them(tmp_path, dtype):
    # Cast to float32 on reading, rows of 1e300 became infinite and rows of 1e-50 zero: `laic fit --vocab` refused
    # what LAIC.fit takes (it rescales each row exactly). Now read as LAIC.fit takes them (float32, each row first
    # scaled exactly by a power of two): the command holds that one copy through the fit, not the file's float64.
    from laic.inputs import as_tensor
    (tmp_path / "nouns.txt").write_text("a\nb\nc\n")
    rows = np.array([[3.0, 4.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 2.0]], dtype=dtype) * \
        np.array([[1e300], [1e-50], [1.0]], dtype=dtype)
    np.save(tmp_path / "embeddings.npy", rows)
    vocab = V.load_vocabulary(tmp_path)
    assert vocab.embeddings.dtype == np.float32 and vocab.embeddings.flags.c_contiguous
    assert np.isfinite(vocab.embeddings).all()
    np.testing.assert_array_equal(vocab.embeddings, as_tensor("V", np.load(tmp_path / "embeddings.npy"), ndim=2))
    directions = vocab.embeddings / np.linalg.norm(vocab.embeddings.astype(np.float64), axis=1, keepdims=True)
    expected = np.array([[0.6, 0.8, 0.0], [0.0, 2 ** -0.5, 2 ** -0.5], [5 ** -0.5, 0.0, 2 * 5 ** -0.5]])
    np.testing.assert_allclose(directions, expected, rtol=1e-6, atol=1e-7)
    np.save(tmp_path / "embeddings.npy", np.eye(3, dtype=np.float16))   # half precision: read as float32
    assert V.load_vocabulary(tmp_path).embeddings.dtype == np.float32


def test_bad_vocabulary_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        V.load_vocabulary(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="neither nouns.txt nor a WordNet"):
        V.load_vocabulary(tmp_path)
    (tmp_path / "nouns.txt").write_text("a\nb\nc\n")
    np.save(tmp_path / "embeddings.npy", np.eye(2, 4))
    with pytest.raises(ValueError, match="one row per name"):
        V.load_vocabulary(tmp_path)
    np.save(tmp_path / "embeddings.npy", np.ones((3, 2, 2)))    # (it said 3 rows do not fit 3 names)
    with pytest.raises(ValueError, match=r"has shape \(3, 2, 2\); it must be 2-D, one row of D values per name"):
        V.load_vocabulary(tmp_path)
    bad = np.eye(3, 4)
    bad[1, 2] = np.inf
    np.save(tmp_path / "embeddings.npy", bad)
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 of 3 rows: row 1 \('b'\); encode those"):
        V.load_vocabulary(tmp_path)
    (tmp_path / "nouns.txt").write_text("\n")
    np.save(tmp_path / "embeddings.npy", np.zeros((0, 4)))
    with pytest.raises(ValueError, match="nouns.txt holds no names"):
        V.load_vocabulary(tmp_path)
    (tmp_path / "nouns.txt").write_text("a\nb\nc\n")
    np.save(tmp_path / "embeddings.npy", np.eye(3, 4, dtype=np.int32))
    with pytest.raises(ValueError, match="holds int32 values; expected floating-point"):
        V.load_vocabulary(tmp_path)
    np.save(tmp_path / "embeddings.npy", np.eye(3, 4) * np.array([[1.0], [0.0], [1.0]]))
    with pytest.raises(ValueError, match=r"all-zero rows, 1 of 3: row 1 \('b'\); they point nowhere"):
        V.load_vocabulary(tmp_path)
    with open(tmp_path / "embeddings.npy", "wb") as f:     # an archive under the array's name
        np.savez(f, embeddings=np.eye(3, 4))
    with pytest.raises(ValueError, match="is a .npz archive"):
        V.load_vocabulary(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no names"):
        V.load_vocabulary(empty)
    latin = tmp_path / "latin.txt"       # a TypeError traceback from `laic fit --vocab` before
    latin.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin.txt' is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        V.load_vocabulary(latin)
    # WordNet's own database file given as a list: its licence and synset records became "names".
    wordnet = tmp_path / "wn"
    wordnet.mkdir()
    (wordnet / "data.noun").write_text("  1 licence\n00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which\n"
                                       "00001930 03 n 01 physical_entity 0 000 | an entity\n")
    with pytest.raises(ValueError, match="is a WordNet database file, not a list of names; pass the folder"):
        V.load_vocabulary(wordnet / "data.noun")
    assert V.load_vocabulary(wordnet).names == ["entity", "physical entity"]


def test_cli_vocab_writes_a_folder_that_load_vocabulary_reads(tmp_path, capsys):
    name = register_tiny_clip()
    model, _, tokenizer = C.load_clip(name, None, "cpu")
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    (tmp_path / "list.txt").write_text("dog\ncat\nice cream\ntraffic light\n")
    out = tmp_path / "vocab"
    argv = ["vocab", "--source", str(tmp_path / "list.txt"), "--model", name, "--pretrained", str(weights),
            "--template", "a photo of a {}.", "--template", "art of the {}.", "--out", str(out), "--quiet"]
    assert cli_main(argv) == 0
    assert "4 nouns" in capsys.readouterr().out

    vocab = V.load_vocabulary(out)
    names = ["dog", "cat", "ice cream", "traffic light"]
    with torch.no_grad():
        a = F.normalize(model.encode_text(tokenizer([f"a photo of a {n}." for n in names])), dim=-1)
        b = F.normalize(model.encode_text(tokenizer([f"art of the {n}." for n in names])), dim=-1)
    assert vocab.names == names
    np.testing.assert_allclose(vocab.embeddings, F.normalize((a + b) / 2, dim=-1).numpy(), atol=1e-5)
    sidecar = json.loads((out / "embeddings.json").read_text())
    assert sidecar["model"] == name and sidecar["templates"] == ["a photo of a {}.", "art of the {}."]

    # A folder of embeddings laic did not write (e.g. the shared one) is never overwritten, names included.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    np.save(foreign / "embeddings.npy", np.eye(2, 4))
    (foreign / "nouns.txt").write_text("x\ny\n")
    assert cli_main(argv[:-2] + [str(foreign), "--quiet"]) == 2
    assert "not written by laic" in capsys.readouterr().err
    assert (foreign / "nouns.txt").read_text() == "x\ny\n"
    # A file as --out, and the meta device: one line naming the option (raw tracebacks before).
    assert cli_main(argv[:-2] + [str(foreign / "nouns.txt"), "--quiet"]) == 2
    assert "nouns.txt' exists and is not a folder" in capsys.readouterr().err
    assert cli_main(argv + ["--device", "meta"]) == 2
    assert "--device='meta' holds shapes but no values" in capsys.readouterr().err
    # A run that reused the embeddings says so (it said "encoded").
    assert cli_main(argv) == 0
    assert "4 nouns from" in (said := capsys.readouterr().out) and " reused " in said

    # Someone's own nouns.txt in --out (no embeddings beside it) was replaced without a word.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "nouns.txt").write_text("# my curated list\napple\n")
    assert cli_main(argv[:-2] + [str(mine), "--quiet"]) == 2
    assert "holds a nouns.txt not written by laic" in capsys.readouterr().err
    assert (mine / "nouns.txt").read_text() == "# my curated list\napple\n"
    in_place = ["vocab", "--source", str(mine), *argv[3:-2], str(mine), "--quiet"]   # encoding it where it is
    # ... which rewrites it as one name per line: its comment went without a word (--source DIR or DIR/nouns.txt).
    for source in (mine, mine / "nouns.txt"):
        assert cli_main(["vocab", "--source", str(source), *in_place[3:]]) == 2
        assert capsys.readouterr().err == (f"laic vocab: error: --source {source}: is the nouns.txt of --out, which "
                                           "laic rewrites as the names it encodes, one per line (without its "
                                           "comments and repeated names); pass --overwrite to let it, or keep your "
                                           "list elsewhere and pass that file as --source\n")
        assert (mine / "nouns.txt").read_text() == "# my curated list\napple\n"
    assert cli_main(in_place + ["--overwrite"]) == 0 and V.load_vocabulary(mine).names == ["apple"]
    assert (mine / "nouns.txt").read_text() == "apple\n"
    assert cli_main(in_place) == 0   # as laic wrote it: encoded in place again without --overwrite
    # Layout alone (no final newline, CRLF, spaces, blank lines) loses nothing: no --overwrite needed.
    (mine / "nouns.txt").write_bytes(b"  apple \r\n\r\n")
    assert cli_main(in_place) == 0 and (mine / "nouns.txt").read_text() == "apple\n"
    # Its names edited since: encoded again from them (refused before: embeddings and names disagreed).
    (mine / "nouns.txt").write_text("apple\npear\n")
    assert cli_main(in_place[:-1] + ["--overwrite", "--quiet"]) == 0
    assert V.load_vocabulary(mine).names == ["apple", "pear"]
    # A damaged sidecar: refused with the fix, and --overwrite computes the embeddings again (refused both ways).
    (mine / "embeddings.json").write_text('{"kind": ')
    assert cli_main(in_place) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(in_place + ["--overwrite"]) == 0
    assert V.load_vocabulary(mine).embeddings.shape[0] == 2


def test_vocab_into_a_folder_of_other_names_says_which_names_differ(tmp_path, capsys):
    # It said "it differs in the texts", naming none of them.
    name, out = register_tiny_clip(), tmp_path / "vocab"
    argv = ["vocab", "--model", name, "--pretrained", "random", "--out", str(out), "--quiet", "--device", "cpu"]
    listings = {"a.txt": "cat\ndog\nemu\n", "b.txt": "cat\nemu\nfox\nowl\n", "c.txt": "emu\ndog\ncat\n"}
    for listing, names in listings.items():
        (tmp_path / listing).write_text(names)
    assert cli_main(argv + ["--source", str(tmp_path / "a.txt")]) == 0
    for listing, change in (("b.txt", "2 added ('fox', 'owl'), 1 removed ('dog')"),
                            ("c.txt", "the same names in another order")):
        assert cli_main(argv + ["--source", str(tmp_path / listing)]) == 2
        assert capsys.readouterr().err == (f"laic vocab: error: --out {out}: holds the embeddings of other names than "
                                           f"these ({change}); pass --update to encode only the names added, "
                                           "--overwrite to encode them all again, or choose another folder\n")
    assert V.load_vocabulary(out).names == ["cat", "dog", "emu"]
    assert cli_main(argv + ["--source", str(tmp_path / "b.txt"), "--overwrite"]) == 0
    assert V.load_vocabulary(out).names == ["cat", "emu", "fox", "owl"]
    assert cli_main(argv + ["--source", str(tmp_path / "b.txt")]) == 0   # the same names: reused


def test_vocab_overwrite_interrupted_before_encoding_says_so(tmp_path, capsys, monkeypatch):
    # The earlier run's embeddings.json (kept until this run's replaces it) made the message "the embeddings ... are
    # finished ... rerun, which only writes the names": the rerun encodes everything again.
    import laic.embed

    name, out = register_tiny_clip(), tmp_path / "vocab"
    (tmp_path / "a.txt").write_text("cat\ndog\n")
    (tmp_path / "b.txt").write_text("oak\npine\n")
    argv = ["vocab", "--model", name, "--pretrained", "random", "--out", str(out), "--quiet", "--device", "cpu"]
    assert cli_main(argv + ["--source", str(tmp_path / "a.txt")]) == 0
    capsys.readouterr()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(laic.embed, "load_clip", stopped)
    assert cli_main(argv + ["--source", str(tmp_path / "b.txt"), "--overwrite"]) == 130
    assert capsys.readouterr().err == (f"laic vocab: interrupted before any noun was encoded; rerun to encode them "
                                       f"into {out}\n")
    assert V.load_vocabulary(out).names == ["cat", "dog"]


@pytest.mark.parametrize("killed_before", ["embeddings.json", "embeddings.npy", "nouns.txt"])
def test_vocab_overwritten_but_interrupted_before_its_names_is_refused_until_rerun(killed_before, tmp_path, capsys,
                                                                                  monkeypatch):
    """`laic vocab --overwrite` killed while the new embeddings, their sidecar and nouns.txt are moved in (a SIGKILL:
    Ctrl-C waits for the moves' end): the folder may pair new rows with the old names, which would name clusters
    with nouns the rows do not encode. Reading it is refused until the same command is run again (which finishes
    the embeddings from its shards and writes the names with them)."""
    import laic.io

    name = register_tiny_clip()
    out = tmp_path / "vocab"
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("cat\ndog\ncar\ntruck\n")
    second.write_text("tulip\nrose\noak\n")     # (nouns.txt is moved first: then 3 names beside 4 rows)

    def argv(source):
        return ["vocab", "--source", str(source), "--model", name, "--pretrained", "random", "--out", str(out),
                "--quiet", "--device", "cpu"]

    assert cli_main(argv(first)) == 0
    atomic_path = laic.io.atomic_path

    @contextlib.contextmanager
    def killed_before_its_move(path):   # written with the embeddings and moved with them: a SIGKILL there
        with atomic_path(path) as tmp:
            yield tmp
            if pathlib.Path(path).name == killed_before:
                raise KeyboardInterrupt

    monkeypatch.setattr(laic.io, "atomic_path", killed_before_its_move)
    capsys.readouterr()
    assert cli_main(argv(second) + ["--overwrite"]) == 130
    assert "interrupted after 1 of 1 shards" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nouns.txt does not hold the names embeddings.npy was encoded from"):
        V.load_vocabulary(out)
    monkeypatch.undo()
    capsys.readouterr()
    assert cli_main(argv(second)) == 0
    assert V.load_vocabulary(out).names == ["tulip", "rose", "oak"]


def test_vocab_stopped_after_its_result_was_moved_in_has_its_names_with_it(tmp_path, capsys, monkeypatch):
    # nouns.txt was written after the embeddings and their sidecar, alone: a stop between them left new rows (of
    # another count) beside the earlier names, refused at `laic fit` as rows and names that differ in number (a QA
    # helper's find, 12-07). Now nouns.txt is moved in with the rows.
    import laic.vocab

    name, out = register_tiny_clip(), tmp_path / "vocab"
    (tmp_path / "a.txt").write_text("cat\ndog\n")
    (tmp_path / "b.txt").write_text("oak\npine\nelm\n")
    argv = ["vocab", "--model", name, "--pretrained", "random", "--out", str(out), "--quiet", "--device", "cpu"]
    assert cli_main(argv + ["--source", str(tmp_path / "a.txt")]) == 0
    capsys.readouterr()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(laic.vocab, "write_names", stopped)     # the names rewritten after the result
    assert cli_main(argv + ["--source", str(tmp_path / "b.txt"), "--overwrite"]) == 130
    assert capsys.readouterr().err == (f"laic vocab: interrupted; the vocabulary in {out} is finished (its embeddings "
                                       "and nouns.txt)\n")
    assert V.load_vocabulary(out).names == ["oak", "pine", "elm"]


def test_the_word_wordnet_means_wordnet_everywhere_and_is_refused_beside_a_folder_so_named(tmp_path, monkeypatch,
                                                                                             capsys):
    """`laic vocab --source wordnet` took a folder named wordnet in the working directory first, `laic fit --vocab
    wordnet` (load_vocabulary) the keyword first: one word, two vocabularies. The word means WordNet in both, and is
    refused beside a folder of that name (./wordnet is the folder; WordNet's own folder is WordNet)."""
    monkeypatch.setenv("WNSEARCHDIR", str(write_wordnet(tmp_path / "wn")))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    name = register_tiny_clip()
    argv = ["--model", name, "--pretrained", "random", "--device", "cpu", "--quiet"]
    assert V.load_vocabulary("wordnet").names == EXPECTED
    assert cli_main(["vocab", "--source", "wordnet", "--out", "encoded", *argv]) == 0
    assert V.load_vocabulary("encoded").names == EXPECTED

    (work / "wordnet").mkdir()   # e.g. `laic vocab --source my.txt --out wordnet`
    (work / "wordnet" / "nouns.txt").write_text("dog\ncat\n")
    for source in ("wordnet", "WordNet"):
        if not pathlib.Path(source).exists():
            continue   # a file system that tells case apart: 'WordNet' is no folder here
        with pytest.raises(ValueError, match=f"'{source}' is ambiguous.*pass './{source}' for the folder"):
            V.load_vocabulary(source)
    # --vocab takes embeddings, which WordNet itself has none of: the word can only be the folder there.
    with pytest.raises(ValueError, match=r"^--vocab wordnet: a folder of names without embeddings"):
        V.read_embedded_vocabulary("wordnet")
    capsys.readouterr()
    assert cli_main(["vocab", "--source", "wordnet", "--out", "other", *argv]) == 2
    said = capsys.readouterr().err
    assert "--source wordnet: 'wordnet' is ambiguous" in said and "'./wordnet'" in said
    assert str(tmp_path / "wn") in said    # how to mean WordNet itself: its folder, found where the word looks
    assert not (work / "other").exists()
    # Each spelled without the ambiguity: the folder as a path, WordNet as its folder.
    assert V.load_vocabulary("./wordnet").names == ["dog", "cat"]
    assert V.load_vocabulary(tmp_path / "wn").names == EXPECTED
    assert cli_main(["vocab", "--source", "./wordnet", "--out", "mine", *argv]) == 0
    assert V.load_vocabulary("mine").names == ["dog", "cat"]

    # WordNet encoded into a folder named wordnet, run again (to resume, or to overwrite): the folder is its own
    # output, not a source (the rerun its interruption advised was refused as ambiguous); laic fit then reads it.
    shutil.rmtree(work / "wordnet")
    for again in ([], ["--overwrite"]):
        assert cli_main(["vocab", "--source", "wordnet", "--out", "wordnet", *argv, *again]) == 0
    assert V.read_embedded_vocabulary("wordnet").names == EXPECTED


def test_names_the_clip_tokenizer_reads_as_one_are_one_name(tmp_path, monkeypatch):
    """prompt_key lowercased and collapsed white space only: "café" typed precomposed and decomposed (NFC / NFD),
    curly and straight apostrophes, HTML entities, ligatures and full-width letters tokenize alike (open_clip cleans
    text with ftfy and html.unescape) and became identical rows. Names the tokenizer tells apart (x² and x2, naïve
    and naive) stay apart."""
    import open_clip

    names = ["caf\u00e9", "cafe\u0301", "o\u2019clock", "o'clock", "AT&amp;T", "AT&T", "\ufb01sh", "fish",
             "\uff24og", "dog", "Dog", "x\u00b2", "x2", "na\u00efve", "naive", "hot  dog", "hot dog"]
    listing = tmp_path / "names.txt"
    listing.write_text("".join(n + "\n" for n in names), encoding="utf-8")
    # Expected: the first of each group of names whose prompts open_clip's own tokenizer turns into the same tokens.
    tokens = open_clip.get_tokenizer("ViT-B-32")([f"a photo of a {n}." for n in names])
    expected, seen = [], []
    for n, row in zip(names, tokens):
        if not any(torch.equal(row, other) for other in seen):
            seen.append(row)
            expected.append(n)
    assert 6 < len(expected) < len(names)    # the sample holds both kinds
    assert V.read_names(listing) == expected
    # WordNet's own file, deduplicated by the same key.
    data = "".join(f"{i:08d} 03 n 01 {n.replace(' ', '_')} 0 000 | gloss\n" for i, n in enumerate(names))
    assert V.parse_data_noun(data.splitlines()) == expected

    # Without ftfy (open_clip needs it; a bare install of laic's readers may lack it): what Unicode and the html
    # module do alone is still done (NFC; entities), never more (NFKC would merge x² and x2).
    monkeypatch.setitem(sys.modules, "ftfy", None)
    assert V.read_names(listing) == ["caf\u00e9", "o\u2019clock", "o'clock", "AT&amp;T", "\ufb01sh", "fish",
                                     "\uff24og", "dog", "x\u00b2", "x2", "na\u00efve", "naive", "hot  dog"]


@pytest.mark.parametrize("text, said", [
    (json.dumps([f"noun{i}" for i in range(50)]) + "\n", "is JSON (a list); laic reads plain text"),
    (json.dumps(["cat", "dog", "bird"], indent=2) + "\n", "is JSON (a list); laic reads plain text"),
    ("cat, dog, bird, fish, horse\n", "its one line holds 5 comma-separated values ('cat, dog, bird, fish, horse')"),
    ("cat,12\ndog,3\nbird,7\n", "every line holds 2 comma-separated fields, as a table does ('cat,12')"),
    ("cat\t12\ndog\t3\nbird\t7\n", "every line holds 2 tab-separated fields, as a table does ('cat\\t12')"),
    ("cat;12;a\ndog;3;b\n", "every line holds 3 semicolon-separated fields, as a table does ('cat;12;a')"),
])
def test_a_list_of_names_on_one_line_json_or_a_table_is_refused(text, said, tmp_path):
    # One line of 2,000 comma-separated names was one 23 KB "noun", encoded and fitted without a word.
    listing = tmp_path / "names.txt"
    listing.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="^vocabulary file .*" + re.escape(said)):
        V.read_names(listing)
    assert cli_main(["vocab", "--source", str(listing), "--model", register_tiny_clip(), "--pretrained", "random",
                     "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["Washington, D.C., USA\n", "Paris, France\nRome, Italy\nTokyo, Japan\n",
                                  "tench, Tinca tinca\ngoldfish, Carassius auratus\n", "cat, dog, bird\n",
                                  "[cat]\n[dog]\n"])
def test_names_that_hold_commas_are_names(text, tmp_path):
    listing = tmp_path / "names.txt"
    listing.write_text(text, encoding="utf-8")
    assert V.read_names(listing) == text.splitlines()


def test_duplicates_are_read_with_a_word_for_those_left_out(tmp_path):
    listing = tmp_path / "names.txt"
    listing.write_text("Washington, D.C.\ncat\nCat\ndog\nCAT\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"left out 2 name\(s\) that the text encoder reads as an earlier one .*: "
                                         r"'Cat', 'CAT'$"):
        assert V.read_names(listing) == ["Washington, D.C.", "cat", "dog"]
    assert V.shown_name("x" * 5000) == repr("x" * 60) + "... (5,000 characters)"   # how a long name is quoted


WORDNET_OTHER_FILES = {   # lines of WordNet 3.0's other database files (Debian's wordnet-base), licence first
    "data.verb": "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 * 00005041 v 0000 | draw air\n"
                 "00002084 29 v 01 respire 1 002 @ 00001740 v 0000 + 00833119 n 0102 02 + 08 00 | undergo respiration",
    "index.verb": "aah v 1 1 @ 1 0 00865794\nabandon v 5 4 @ ~ > ^ 5 4 02228031 02227741 02076676 00614057 00613393",
    "data.adj": "00001740 00 a 01 able 0 005 = 05200169 n 0000 | (usually followed by `to') having the means\n"
                "00003553 00 s 02 emergent 0 emerging 0 003 & 00003356 a 0000 | coming into existence",
    "index.adj": ".22-caliber a 1 1 \\ 1 0 03146311\n.22-calibre a 1 1 \\ 1 0 03146311\n"
                 ".38-caliber a 1 1 \\ 1 0 03146560",
    "data.adv": "00001740 02 r 01 a_cappella 0 000 | without musical accompaniment\n"
                "00001837 02 r 01 AD 0 001 \\ 02577755 a 0101 | in the Christian era",
    "index.adv": "'tween r 1 0 1 0 00250898\na cappella r 1 1 \\ 1 0 00001740\naback r 2 0 2 0 00073668 00513357",
}


@pytest.mark.parametrize("name", sorted(WORDNET_OTHER_FILES))
def test_every_wordnet_database_file_is_refused_as_a_list_of_names(name, tmp_path):
    # Only data.noun / index.noun were refused: data.verb gave 13,796 "names", its licence lines among them.
    folder = write_wordnet(tmp_path / "dict")
    path = folder / name
    path.write_text("  1 This software and database is being provided to you, the LICENSEE, by\n"
                    "  2 Princeton University under the following license.\n" + WORDNET_OTHER_FILES[name] + "\n")
    with pytest.raises(ValueError, match="is a WordNet database file, not a list of names"):
        V.read_names(path)
    with pytest.raises(ValueError, match="is a WordNet database file"):
        V.load_vocabulary(path)
    assert V.load_vocabulary(folder).names == EXPECTED    # the folder, as the message says


def test_laic_fit_vocab_says_what_it_takes_and_how_to_encode_names(tmp_path, monkeypatch):
    # `laic fit --vocab wordnet` without WordNet said to install it, then (installed) that it had no embeddings; a
    # missing path was told to "pass 'wordnet' or a text file", both of which --vocab then refused.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / "nowhere"))
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n")
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "nouns.txt").write_text("dog\ncat\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "rows").mkdir()
    np.save(tmp_path / "rows" / "embeddings.npy", np.eye(2, 4, dtype=np.float32))
    np.save(tmp_path / "array.npy", np.eye(2, 4, dtype=np.float32))
    for source, said in ((tmp_path / "array.npy", "an array alone, whose rows have no names; --vocab takes a folder"),
                         (tmp_path / "rows", "holds embeddings.npy but no nouns.txt (the names of its rows); --vocab "
                                             "takes a folder"),
                         ("wordnet", "WordNet's nouns without embeddings: encode them first with `laic vocab "
                                     "--source wordnet --model ... --out DIR` and pass --vocab DIR"),
                         (names, "a file of names without embeddings: encode them first"),
                         (tmp_path / "named", "a folder of names without embeddings: encode them first"),
                         (tmp_path / "empty", "holds no embeddings.npy and nouns.txt; --vocab takes a folder with "
                                              "embeddings.npy + nouns.txt, as `laic vocab --out DIR` writes"),
                         (tmp_path / "missing", "no such folder; --vocab takes a folder with embeddings.npy")):
        with pytest.raises(ValueError) as refused:
            V.read_embedded_vocabulary(source)
        assert said in str(refused.value) and "wordnet-base" not in str(refused.value)
        assert "pass 'wordnet'" not in str(refused.value)


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_wnsearchdir_is_the_one_place_looked_in_when_set(where, tmp_path, monkeypatch):
    """A WNSEARCHDIR without WordNet (a typo, the wrong folder) was skipped for another WordNet without a word;
    WordNet's own tools look nowhere else."""
    write_wordnet(tmp_path / "nltk" / "corpora" / "wordnet")
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / where))
    assert V.wordnet_search_dirs() == [tmp_path / where]
    with pytest.raises(FileNotFoundError, match=f"WNSEARCHDIR={tmp_path / where} holds no WordNet data.noun.*unset"):
        V.wordnet_nouns()
    with pytest.raises(ValueError, match="--vocab wordnet: WordNet's nouns without embeddings: encode them first"):
        V.read_embedded_vocabulary("wordnet")   # laic vocab --source wordnet then says where it looked
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / "nltk"))   # an NLTK data folder is a WordNet folder too
    assert V.wordnet_nouns() == EXPECTED


def test_a_folder_written_by_write_folder_reads_back_row_for_name(tmp_path):
    rng = np.random.default_rng(0)
    embeddings, names = rng.standard_normal((4, 6)).astype(np.float32), ["dog", "hot dog", "cat", "été"]
    V.write_folder(tmp_path / "vocab", embeddings, names)
    assert (tmp_path / "vocab" / "nouns.txt").read_bytes() == "dog\nhot dog\ncat\nété\n".encode()
    read = V.load_vocabulary(tmp_path / "vocab")
    assert read.names == names
    np.testing.assert_array_equal(read.embeddings, embeddings)
    with pytest.raises(ValueError, match="3 embedding rows for 4 names"):
        V.write_folder(tmp_path / "other", embeddings[:3], names)
    # Written, then refused by the reader, which splits nouns.txt as str.splitlines does (at a CR, U+2028 too).
    for bad in (["a\nb", "c", "d", "e"], ["a", " ", "d", "e"], ["a\rb", "c", "d", "e"], ["a\u2028b", "c", "d", "e"],
                ["dog\n", "c", "d", "e"], ["a", "dog\r", "d", "e"]):   # a line's end too: the folder did not read back
        with pytest.raises(ValueError, match=r"is blank or spans lines; one name a line"):
            V.write_folder(tmp_path / "other", embeddings, bad)
    for bad in ([" dog", "c", "d", "e"], ["a", "cat\t", "d", "e"]):   # read back stripped: another name
        with pytest.raises(ValueError, match=r"has white space at an end, which nouns.txt does not keep"):
            V.write_folder(tmp_path / "other", embeddings, bad)
    assert not (tmp_path / "other").exists()


def test_vocab_update_encodes_only_the_names_added_and_keeps_every_other_row(tmp_path, capsys, monkeypatch):
    # A names file edited after an encoding was encoded whole again (--overwrite): 82k nouns for a few added.
    import laic.embed

    name, out, scratch = register_tiny_clip(), tmp_path / "vocab", tmp_path / "scratch"
    argv = ["vocab", "--model", name, "--pretrained", "random", "--quiet", "--device", "cpu"]
    listings = {"a": "cat\ndog\nemu\n", "b": "emu\nfox\ncat\nowl\n", "c": "owl\ncat\nfox\nemu\n"}
    for listing, names in listings.items():
        (tmp_path / f"{listing}.txt").write_text(names)
    source = {listing: ["--source", str(tmp_path / f"{listing}.txt")] for listing in listings}
    assert cli_main(argv + source["a"] + ["--out", str(out)]) == 0
    earlier = V.load_vocabulary(out)
    encoded, encode = [], laic.embed._encode_texts

    def counted(encode_fn, tokenizer, texts, *rest):
        encoded.extend(texts)
        return encode(encode_fn, tokenizer, texts, *rest)

    monkeypatch.setattr(laic.embed, "_encode_texts", counted)
    capsys.readouterr()
    assert cli_main(argv + source["b"] + ["--out", str(out), "--update"]) == 0
    assert encoded == ["fox", "owl"]
    assert (f"4 nouns from {tmp_path / 'b.txt'} updated (2 added ('fox', 'owl'), 1 removed ('dog'); every other row "
            "kept) ") in capsys.readouterr().out
    updated = V.load_vocabulary(out)
    assert updated.names == ["emu", "fox", "cat", "owl"]
    np.testing.assert_array_equal(updated.embeddings[[0, 2]], earlier.embeddings[[2, 0]])
    # What a run from scratch writes: the same sidecar, the rows to float32 rounding (other batches).
    assert cli_main(argv + source["b"] + ["--out", str(scratch)]) == 0
    np.testing.assert_allclose(updated.embeddings, V.load_vocabulary(scratch).embeddings, atol=1e-6)
    assert json.loads((out / "embeddings.json").read_text()) == json.loads((scratch / "embeddings.json").read_text())
    assert (out / "nouns.txt").read_bytes() == (scratch / "nouns.txt").read_bytes()

    # The same names in another order: none encoded; then nothing to update: reused.
    encoded.clear()
    assert cli_main(argv + source["c"] + ["--out", str(out), "--update"]) == 0
    assert encoded == [] and "updated (the same names in another order; every other row kept)" in capsys.readouterr().out
    reordered = V.load_vocabulary(out)
    assert reordered.names == ["owl", "cat", "fox", "emu"]
    np.testing.assert_array_equal(reordered.embeddings, updated.embeddings[[3, 2, 1, 0]])
    assert cli_main(argv + source["c"] + ["--out", str(out), "--update"]) == 0
    assert " reused " in capsys.readouterr().out and encoded == []

    # What an update cannot take, refused with the folder left as it was.
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="2"):
        cli_main(argv + source["a"] + ["--out", str(out), "--update", "--overwrite"])
    assert "argument --overwrite: not allowed with argument --update" in capsys.readouterr().err
    other_templates = ["--template", "art of the {}."]
    assert cli_main(argv + source["a"] + ["--out", str(out), "--update"] + other_templates) == 2
    said = capsys.readouterr().err
    assert "differs in templates" in said and "--update" not in said   # other rows: an update keeps none
    assert cli_main(argv + source["a"] + ["--out", str(out)] + other_templates) == 2   # (an update not offered)
    assert capsys.readouterr().err.endswith("(1 added ('dog'), 2 removed ('owl', 'fox')); pass --overwrite to "
                                            "encode these names there (made with another model or templates, none "
                                            "of its rows can be kept), or choose another folder\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept and encoded == []
    # A list edited in place (--source OUT) with a comment that the rewrite would drop: as without --update.
    (out / "nouns.txt").write_text("# mine\nowl\ncat\nfox\nemu\nant\n")
    assert cli_main(argv + ["--source", str(out), "--out", str(out), "--update"]) == 2
    assert "(without its comments and repeated names); pass --overwrite to let it" in capsys.readouterr().err
    (out / "nouns.txt").write_bytes(kept["nouns.txt"])

    # A folder written before its sidecar held its names: updated by the nouns.txt beside it, which holds them.
    sidecar = json.loads((out / "embeddings.json").read_text())
    del sidecar["texts"]
    (out / "embeddings.json").write_text(json.dumps(sidecar))
    assert cli_main(argv + source["a"] + ["--out", str(out), "--update"]) == 0
    assert encoded == ["dog"] and "updated (1 added ('dog'), 2 removed ('owl', 'fox'); " in capsys.readouterr().out
    np.testing.assert_array_equal(V.load_vocabulary(out).embeddings[[0, 2]], reordered.embeddings[[1, 3]])
    # ... and refused where nothing says which row is which name's (nouns.txt edited since), or damaged.
    encoded.clear()
    (out / "nouns.txt").write_text("cat\ndog\nemus\n")
    sidecar = json.loads((out / "embeddings.json").read_text())
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "embeddings.json").write_text(json.dumps({k: v for k, v in sidecar.items() if k != "texts"}))
    assert cli_main(argv + source["b"] + ["--out", str(out), "--update"]) == 2
    assert ("they were written before laic kept their names in embeddings.json (12-07), and no nouns.txt beside "
            "them holds the names they were encoded from, so nothing says which row is which name's; replace it "
            "with laic vocab --overwrite") in capsys.readouterr().err
    (out / "embeddings.json").write_text(json.dumps(dict(sidecar, texts=[[name] for name in sidecar["texts"]])))
    assert cli_main(argv + source["b"] + ["--out", str(out), "--update"]) == 2
    assert "they are damaged (embeddings.json's texts are not the 3 names its digest says)" in capsys.readouterr().err
    assert cli_main(argv + source["b"] + ["--out", str(out)]) == 2   # (a TypeError: the refusal listed the names)
    assert "differs in the texts; use another folder" in capsys.readouterr().err   # (no update offered)
    assert encoded == [] and (out / "embeddings.npy").read_bytes() == kept["embeddings.npy"]


def test_vocab_update_takes_over_a_first_run_stopped_before_its_list_was_edited(tmp_path, capsys, monkeypatch):
    # Refused before as "the interrupted run" to rerun "as it was started" (the list was edited since) or replace
    # with --overwrite, which deleted its finished shards: hours of encoding at WordNet's size on a CPU.
    import functools

    import laic.embed

    name, out, scratch = register_tiny_clip(), tmp_path / "vocab", tmp_path / "scratch"
    argv = ["vocab", "--model", name, "--pretrained", "random", "--quiet", "--device", "cpu"]
    (tmp_path / "a.txt").write_text("cat\ndog\nemu\nfox\nowl\nant\n")
    (tmp_path / "b.txt").write_text("fox\ncat\nhen\nemu\nant\n")
    monkeypatch.setattr(laic.embed, "embed_texts", functools.partial(laic.embed.embed_texts, shard_size=2))
    encoded, encode = [], laic.embed._encode_texts

    def counted(encode_fn, tokenizer, texts, *rest):
        if stop_at_call and len(encoded) + 1 == stop_at_call:
            raise KeyboardInterrupt
        encoded.append(list(texts))
        return encode(encode_fn, tokenizer, texts, *rest)

    monkeypatch.setattr(laic.embed, "_encode_texts", counted)
    stop_at_call = 3     # a shard (two names) a call: cat to fox encoded
    assert cli_main(argv + ["--source", str(tmp_path / "a.txt"), "--out", str(out)]) == 130
    assert "interrupted after 2 of 3 shards" in capsys.readouterr().err
    stop_at_call, encoded[:] = None, []
    assert cli_main(argv + ["--source", str(tmp_path / "b.txt"), "--out", str(out)]) == 2
    assert ("bring it up to date with laic vocab --update (laic.embed.embed_texts(update=True) in Python), which "
            "encodes only the names added since (keeping the rows its finished shards hold of the names still "
            "listed)") in capsys.readouterr().err
    assert cli_main(argv + ["--source", str(tmp_path / "b.txt"), "--out", str(out), "--update"]) == 0
    assert sum(encoded, []) == ["hen", "ant"]
    assert cli_main(argv + ["--source", str(tmp_path / "b.txt"), "--out", str(scratch)]) == 0
    updated = V.load_vocabulary(out)
    assert updated.names == ["fox", "cat", "hen", "emu", "ant"]
    np.testing.assert_allclose(updated.embeddings, V.load_vocabulary(scratch).embeddings, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in scratch.iterdir())
