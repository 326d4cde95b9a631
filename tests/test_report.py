"""The cluster gallery on real CIFAR-10 images with their real CLIP features and labels."""
import collections
import csv
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from laic import io, report, run_dir
from laic.cli import main
from laic.metrics import evaluate
from tiny_clip import write_cifar_pngs

N, K = 60, 4


@pytest.fixture(scope="module")
def cifar(tmp_path_factory, shared_data):
    from conftest import skip_without_data

    folder = shared_data / "cifar10-test-first500"
    skip_without_data(folder / "features.npy")
    paths = write_cifar_pngs(tmp_path_factory.mktemp("png"), N)
    truth = np.load(folder / "labels.npy")[:N]
    classes = (folder / "classes.txt").read_text().split()
    # A clustering to draw: the true classes folded onto K clusters, with every 7th image moved to the next one.
    clusters = truth % K
    clusters[::7] = (clusters[::7] + 1) % K
    return {"paths": paths, "features": np.load(folder / "features.npy")[:N].astype(np.float32), "truth": truth,
            "classes": classes, "clusters": clusters}


def test_typical_members_are_the_closest_to_the_cluster_centre():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 8))
    labels = rng.integers(0, 3, size=50)
    for c in range(3):
        members = [i for i in range(50) if labels[i] == c]
        unit = {i: features[i] / np.linalg.norm(features[i]) for i in members}
        centre = sum(unit.values()) / len(members)
        centre = centre / np.linalg.norm(centre)
        expected = sorted(members, key=lambda i: (-float(unit[i] @ centre), i))[:5]
        assert list(report.typical_members(features, labels, c, 5)) == expected
    assert len(report.typical_members(features, labels, 7, 5)) == 0


def test_cluster_table_counts_sizes_majorities_and_purity(cifar):
    table = report.cluster_table(cifar["clusters"], K + 1, [["x"]] * (K + 1), cifar["truth"], cifar["classes"])
    for row in table[:K]:
        members = cifar["truth"][cifar["clusters"] == row["cluster"]]
        (major, count), = collections.Counter(members.tolist()).most_common(1)
        assert row["size"] == len(members)
        assert row["majority_name"] == cifar["classes"][major]
        assert row["purity"] == pytest.approx(count / len(members))
    assert table[K]["size"] == 0 and "purity" not in table[K]  # an empty cluster has no majority


def _referenced(page: str):
    return set(re.findall(r'<img[^>]* src="([^"]+)"', page))


def _assignments(folder):
    """assignments.csv's rows as lists of strings, its header first."""
    with open(folder / report.ASSIGNMENTS, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_report_page_and_pictures_reference_each_other(cifar, tmp_path):
    names = [[f"noun {c}", "<b>&"] for c in range(K)]  # markup in a name must come out escaped
    run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], cifar["features"], cifar["paths"], names)
    index = report.write_report(tmp_path / "run", labels_true=cifar["truth"], class_names=cifar["classes"],
                                per_cluster=4)
    assert index == tmp_path / "run" / "report" / "index.html"
    page = index.read_text()
    pngs = {p.name for p in index.parent.glob("*.png")}
    assert _referenced(page) == pngs == {"overview.png", "map.png"} | {f"cluster_{c:03d}.png" for c in range(K)}
    for name in pngs:
        with Image.open(index.parent / name) as image:   # (a cluster's: 4 thumbnails in a row, 96 px each)
            assert image.format == "PNG" and min(image.size) >= (176 if name.startswith("cluster_") else 200)
    # Every image's cluster, its names as written (a CSV escapes nothing of HTML) and its true class, in row order.
    assert f'<a href="{report.ASSIGNMENTS}">' in page
    assert _assignments(index.parent) == [["path", "cluster", "names", "class"]] + [
        [str(path), str(c), f"noun {c}; <b>&", cifar["classes"][t]]
        for path, c, t in zip(cifar["paths"], cifar["clusters"], cifar["truth"])]
    # Drawn again once the run no longer names its images: the page has no pictures, and none are left over.
    (tmp_path / "run" / "images.txt").unlink()
    report.write_report(tmp_path / "run", per_cluster=4)
    assert {p.name for p in index.parent.glob("*.png")} == _referenced(index.read_text()) == {"overview.png", "map.png"}
    assert not (index.parent / report.ASSIGNMENTS).exists() and report.ASSIGNMENTS not in index.read_text()
    assert "<b>&" not in page and "&lt;b&gt;&amp;" in page
    for row in report.cluster_table(cifar["clusters"], K, names, cifar["truth"], cifar["classes"]):
        assert f"{row['size']} images · majority {row['majority_name']} · purity {100 * row['purity']:.0f}%" in page
    scores = evaluate(cifar["truth"], cifar["clusters"])
    assert f"ACC {100 * scores['acc']:.1f}%" in page


def test_missing_images_are_said_and_odd_line_breaks_in_names_kept(cifar, tmp_path):
    # Images moved away after the fit were drawn as grey squares without a word; a name holding U+2028 (which
    # str.splitlines splits at) made images.txt read as one path more than labels.npy, and the report refused it.
    odd = [p.with_name(f"{p.stem}\u2028{p.suffix}") if i == 0 else p for i, p in enumerate(cifar["paths"])]
    odd[0].write_bytes(cifar["paths"][0].read_bytes())
    gone = [p.with_name("moved_" + p.name) for p in cifar["paths"][1:3]]
    paths = odd[:1] + gone + odd[3:]
    names = [[f"noun {c}"] for c in range(K)]
    run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], cifar["features"], paths, names)
    assert [str(p) for p in run_dir.read_run(tmp_path / "run").image_paths] == [str(p) for p in paths]
    with pytest.warns(UserWarning, match=r"2 of the 60 images pictured are missing \(e.g. '.*moved_img_000[12].png'\)"
                      r": moved or deleted since the fit\?") as said:
        index = report.write_report(tmp_path / "run", per_cluster=N)
    assert [w.filename for w in said] == [__file__]
    assert "<b>2 of the 60 images pictured are missing</b>" in index.read_text()
    assert [row[0] for row in _assignments(index.parent)[1:]] == [str(p) for p in paths]   # U+2028 quoted, kept
    # A file name that is not UTF-8 (Linux allows any bytes): written back as its bytes (the report failed on it).
    latin = odd[3].with_name(os.fsdecode(b"caf\xe9.png"))
    latin.write_bytes(odd[3].read_bytes())
    run_dir.write_run_dir(tmp_path / "latin", cifar["clusters"], cifar["features"], odd[:3] + [latin] + odd[4:], names)
    report.write_report(tmp_path / "latin", per_cluster=N)
    written = (tmp_path / "latin" / "report" / report.ASSIGNMENTS).read_bytes()
    assert os.fsencode(str(latin)) in written


@pytest.mark.parametrize("given", ["the folder", "its features.npy"])
def test_report_reads_a_laic_fit_run_through_the_embedding_cache(cifar, tmp_path, capsys, given):
    # What `laic fit --features CACHE` leaves: labels.npy, clusters.json and run.json naming a `laic embed` folder,
    # whose sidecar lists the image files. A fit given the cache's features.npy named no images: no pictures.
    from laic.embed_cache import CACHE_FORMAT

    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / "features.npy", cifar["features"])
    (cache / "features.json").write_text(json.dumps({"kind": "image", "format": CACHE_FORMAT,
                                                     "files": [str(p) for p in cifar["paths"]]}))
    run = tmp_path / "run"
    run.mkdir()
    np.save(run / "labels.npy", cifar["clusters"])
    (run / "run.json").write_text(json.dumps({"features": str(cache if given == "the folder" else
                                                              cache / "features.npy")}))
    sizes = np.bincount(cifar["clusters"], minlength=K)
    names = [[f"thing{c}"] if c else [] for c in range(K)]   # cluster 0 named by no noun (e.g. fitted without text)
    (run / "clusters.json").write_text(json.dumps({"k": K, "n_images": N, "clusters": [
        {"cluster": c, "size": int(sizes[c]), "names": names[c]} for c in range(K)]}))

    assert main(["report", str(run), "--out", str(tmp_path / "gallery"), "--per-cluster", "2"]) == 0
    printed = capsys.readouterr()
    assert "the PNGs and assignments.csv, every image's cluster, are beside it" in printed.out
    bar = printed.err
    assert "drawing clusters: 100%" in bar and f"{K}/{K}" in bar    # the progress of a long drawing
    assert main(["report", str(run), "--out", str(tmp_path / "quiet"), "--per-cluster", "2", "--quiet"]) == 0
    assert "drawing clusters" not in capsys.readouterr().err
    page = (tmp_path / "gallery" / "index.html").read_text()
    assert _referenced(page) == {p.name for p in (tmp_path / "gallery").glob("*.png")}
    assert all(f"Cluster {c}: thing{c}" in page for c in range(1, K))
    assert "<h2>Cluster 0</h2>" in page   # (it said "Cluster 0: cluster 0")
    assert "purity" not in page  # no labels given
    assert _assignments(tmp_path / "gallery") == [["path", "cluster", "names"]] + [
        [str(p), str(c), ", ".join(names[c])] for p, c in zip(cifar["paths"], cifar["clusters"])]


def test_images_moved_since_the_fit_are_drawn_from_where_they_are_now(cifar, tmp_path, capsys):
    # A run whose photo folder was moved could not be pointed to it: every picture was a grey square.
    photos, moved = tmp_path / "photos", tmp_path / "backup" / "pics"
    photos.mkdir()
    paths = [pathlib.Path(shutil.copy(p, photos / p.name)) for p in cifar["paths"]]
    run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], cifar["features"], paths, [["x"]] * K)
    before = report.write_report(tmp_path / "run", out_dir=tmp_path / "before", per_cluster=4).parent
    moved.parent.mkdir()
    photos.rename(moved)
    with pytest.warns(UserWarning, match=r"grey squares in the report; where their folder was moved, pass "
                                         r"--images-moved FROM TO \(images_moved=\(FROM, TO\) in Python\)"):
        report.write_report(tmp_path / "run", out_dir=tmp_path / "grey", per_cluster=4)
    argv = ["report", str(tmp_path / "run"), "--out", str(tmp_path / "after"), "--per-cluster", "4", "--quiet"]
    assert main(argv + ["--images-moved", str(photos), str(moved)]) == 0
    assert "missing" not in capsys.readouterr().err
    after = tmp_path / "after"
    for c in range(K):   # the same pictures as before the move (the grey report's differ)
        name = report.cluster_png_name(c)
        assert (after / name).read_bytes() == (before / name).read_bytes()
        assert (tmp_path / "grey" / name).read_bytes() != (before / name).read_bytes()
    assert [row[0] for row in _assignments(after)[1:]] == [str(moved / p.name) for p in paths]

    # What cannot be taken, said with the way forward.
    for images_moved, error, said in (
            ((tmp_path / "elsewhere", moved), ValueError, "none of the run's images lies under FROM .*elsewhere "
                                                          "\\(they all lie under .*photos\\); pass the folder they "
                                                          "were in at the fit"),
            ((photos, tmp_path), FileNotFoundError, "the run's images are not under TO .* \\(e.g. .*photos/img_.* is "
                                                    "not at .*/img_.*\\); pass the folder that holds now what "),
            ((photos, tmp_path / "nowhere"), FileNotFoundError, "TO .*nowhere is not a folder"),
            (str(moved), ValueError, "must be two folders, \\(FROM, TO\\), got '.*pics'"),
            (3, ValueError, "must be two folders, \\(FROM, TO\\), got 3")):
        with pytest.raises(error, match=said):
            report.write_report(tmp_path / "run", out_dir=tmp_path / "refused", images_moved=images_moved)
        assert not (tmp_path / "refused").exists()
    (tmp_path / "run" / "images.txt").unlink()   # a run on features alone
    with pytest.raises(ValueError, match="the run names no images .*; leave it out"):
        report.write_report(tmp_path / "run", out_dir=tmp_path / "refused", images_moved=(photos, moved))


def test_report_errors_name_the_problem(cifar, tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no labels.npy" in capsys.readouterr().err
    run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], cifar["features"], cifar["paths"])
    with pytest.raises(ValueError, match="has 59 labels but the run has 60 images"):
        report.write_report(tmp_path / "run", labels_true=cifar["truth"][:59])
    with pytest.raises(ValueError, match="must describe the same N images"):
        run_dir.write_run_dir(tmp_path / "bad", cifar["clusters"], cifar["features"][:10], cifar["paths"])


def test_report_is_drawn_only_into_a_new_empty_or_report_folder(cifar, tmp_path, capsys):
    """--out may be new, empty or an earlier report (redrawn); a file, or a folder of other things, is left alone
    with an error that names --out (before: a raw FileExistsError, or the page mixed into the folder)."""
    run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], cifar["features"], cifar["paths"])
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "features.npy").write_bytes(b"keep")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    for out, why in ((a_file, "exists and is not a folder"), (foreign, "is not empty and is not a laic report")):
        assert main(["report", str(tmp_path / "run"), "--out", str(out), "--per-cluster", "2"]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and why in err
    assert sorted(p.name for p in foreign.iterdir()) == ["features.npy"] and a_file.read_text() == "keep"
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for _ in range(2):   # into an empty folder, then over its own report (with a desktop's hidden file)
        assert main(["report", str(tmp_path / "run"), "--out", str(gallery), "--per-cluster", "2"]) == 0
        (gallery / ".DS_Store").write_bytes(b"")
    assert all(report.is_report_file(p.name) or p.name == ".DS_Store" for p in gallery.iterdir())
    assert (gallery / "index.html").is_file()
    # A folder holding a page of that name that laic did not write (a site's) was redrawn over (a review, 12-06).
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>my own homepage</h1>")
    assert main(["report", str(tmp_path / "run"), "--out", str(site), "--per-cluster", "2"]) == 2
    assert "is not a laic report (it holds index.html, a page laic did not write)" in capsys.readouterr().err
    assert [p.name for p in site.iterdir()] == ["index.html"] and "homepage" in (site / "index.html").read_text()


def test_class_ids_with_gaps_are_tabled_by_the_classes_present(tmp_path):
    # WordNet-offset-like ids as ground truth: tables sized by the 3 classes present, named by their ids; once a
    # confusion matrix of 2 million empty rows, and an 8 TiB allocation for an id of 2**40. A -1 (unlabelled) and
    # class names fewer than the ids are refused.
    rng = np.random.default_rng(0)
    paths = []
    (tmp_path / "images").mkdir()   # (the report beside them, not among them)
    for i in range(24):
        paths.append(tmp_path / "images" / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    clusters = np.arange(24) % 3
    ids = np.array([2 ** 40, 2084071, 7])
    truth = ids[(np.arange(24) + (np.arange(24) % 5 == 0)) % 3]
    run_dir.write_run_dir(tmp_path / "run", clusters, rng.normal(size=(24, 8)).astype(np.float32), paths)
    page = report.write_report(tmp_path / "run", labels_true=truth, per_cluster=2).read_text()
    table = report.cluster_table(clusters, 3, [[]] * 3, np.unique(truth, return_inverse=True)[1],
                                 [f"class {v}" for v in np.unique(truth)])
    for row in table:
        members = truth[clusters == row["cluster"]]
        (major, count), = collections.Counter(members.tolist()).most_common(1)
        assert row["majority_name"] == f"class {major}" and f"class {major}" in page
        assert row["purity"] == pytest.approx(count / len(members))
    with pytest.raises(ValueError, match=r"labels_true \(--labels\) holds 2 negative label"):
        report.write_report(tmp_path / "run", labels_true=np.where(np.arange(24) < 2, -1, truth), per_cluster=2)
    with pytest.raises(ValueError, match="name 8 classes but the ground truth holds class id 8"):
        report.write_report(tmp_path / "run", labels_true=np.arange(24) % 9, class_names=list("abcdefgh"))


def test_report_options_as_a_user_passes_them(cifar, tmp_path, capsys):
    # numpy's int for per_cluster was refused as "must be an int ... got np.int64(4)"; a str of class names was ten
    # one-letter names; class names without ground truth were ignored without a word (a short file unnoticed).
    run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], cifar["features"], cifar["paths"])
    assert report.write_report(tmp_path / "run", per_cluster=np.int64(2)).is_file()
    with pytest.raises(ValueError, match=r"class_names \(--classes\) must be a list of names, one per class id"):
        report.write_report(tmp_path / "run", labels_true=cifar["truth"], class_names="abcdefghij", per_cluster=2)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    assert main(["report", str(tmp_path / "run"), "--classes", str(classes), "--per-cluster", "2"]) == 2
    assert "pass the ground truth (labels_true, --labels) with them" in capsys.readouterr().err


def test_a_report_leaves_the_programs_matplotlib_backend_and_figures_alone(tmp_path):
    # matplotlib.use("Agg") at every drawing switched a notebook's or an application's backend for good: their own
    # figures no longer showed (12-06). In a process of its own, with a backend that is not Agg.
    script = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
mine = plt.figure()
import numpy as np
from laic import report
report.draw_overview(__import__("pathlib").Path({str(tmp_path / "overview.png")!r}),
                     [{{"cluster": c, "size": 5, "purity": 1.0}} for c in range(3)], np.arange(15) % 3,
                     np.arange(15) % 3, None)
print(matplotlib.get_backend(), plt.get_fignums() == [mine.number])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "True"]
    assert (tmp_path / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_confusion_of_many_classes_shows_no_positions_as_class_ids():
    # Beyond 40 classes the class axis showed 0, 10, 20 ...: positions among the classes present, while the cards
    # name class ids (1000, 1100, ...).
    labels = np.arange(500) % 5
    for n_classes, ticks in ((50, 0), (12, 12)):
        fig = report._figure()
        ax = fig.subplots()
        report._draw_confusion(ax, fig, labels, np.arange(500) % n_classes, None, 5)
        assert len(ax.get_yticks()) == ticks
        assert ax.get_ylabel() == ("classes, in id order" if n_classes > 40 else "class")


@pytest.mark.parametrize("shape, most", [((5, 7), 3), ((40, 9), 8), ((9, 40), 8), ((6, 6), 6), ((1, 13), 2)])
def test_the_confusion_is_drawn_in_blocks_of_cells_each_its_largest_share(shape, most, monkeypatch):
    """Drawn cell by cell, 10,000 classes x 10,000 clusters held 5 GB in matplotlib for a figure of 1,600 pixels:
    beyond CONFUSION_CELLS a side the cells are pooled, each block its largest share."""
    cells = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    pooled = report.max_pooled(cells, most)
    steps = [-(-n // most) for n in shape]
    expected = np.array([[cells[i:i + steps[0], j:j + steps[1]].max() for j in range(0, shape[1], steps[1])]
                         for i in range(0, shape[0], steps[0])])
    np.testing.assert_array_equal(pooled, expected)
    assert max(pooled.shape) <= most and (pooled is cells) == (max(shape) <= most)
    # What the overview draws: the matched-order shares, pooled.
    monkeypatch.setattr(report, "CONFUSION_CELLS", most)
    labels, truth = np.arange(400) % shape[1], np.arange(400) * 7 % shape[0]
    fig = report._figure()
    ax = fig.subplots()
    report._draw_confusion(ax, fig, labels, truth, None, shape[1])
    drawn = ax.get_images()[0].get_array()
    assert drawn.shape == pooled.shape and drawn.max() <= 1


def test_a_refusal_of_features_says_how_they_differ_byte_order_aside(tmp_path):
    # A run recorded before 12-07 from a big-endian file holds '>f4': other values of that shape and dtype were
    # described as "8 x 3 float32", a dtype difference that is not there.
    recorded = {"shape": [8, 3], "dtype": ">f4", "sha256": "0" * 64}
    x = np.random.default_rng(0).standard_normal((8, 3))
    for saved, said in ((x.astype(">f4"), "these hold other values"), (x.astype("<f4"), "these hold other values"),
                        (x.astype(np.float16), "these are 8 x 3 float16"),
                        (x[:5].astype(">f4"), "these are 5 x 3 float32")):
        np.save(tmp_path / "f.npy", saved)
        assert run_dir._unlike(tmp_path / "f.npy", recorded) == said


def test_class_names_as_ground_truth_name_the_classes(tmp_path):
    # Names were refused (dtype <U3); numbered, they would have lost their names ("class 0") or taken --classes'
    # names in another order.
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    paths = []
    for i in range(18):
        paths.append(tmp_path / "images" / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    clusters = np.arange(18) % 3
    names = np.array(["zebra", "ant", "moth"])[(np.arange(18) + (np.arange(18) % 4 == 0)) % 3]
    run_dir.write_run_dir(tmp_path / "run", clusters, rng.normal(size=(18, 8)).astype(np.float32), paths)
    index = report.write_report(tmp_path / "run", labels_true=names, per_cluster=2)
    with open(index.parent / report.ASSIGNMENTS, newline="", encoding="utf-8") as f:
        assert [row["class"] for row in csv.DictReader(f)] == names.tolist()
    with pytest.raises(ValueError, match=r"holds class names already: leave out class_names \(--classes\)"):
        report.write_report(tmp_path / "run", labels_true=names, class_names=["a", "b", "c"], per_cluster=2)


def test_a_report_of_another_run_is_replaced_only_with_overwrite(tmp_path, capsys):
    # `laic report B --out DIR` replaced run A's report in DIR without a word (its assignments.csv edited since).
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    paths = [tmp_path / "images" / f"img{i}.png" for i in range(6)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    features = rng.normal(size=(6, 8)).astype(np.float32)
    a, b = tmp_path / "run_a", tmp_path / os.fsdecode(b"run_b_caf\xe9")   # (a name that is not UTF-8 reads back)
    run_dir.write_run_dir(a, np.arange(6) % 2, features, paths)
    run_dir.write_run_dir(b, np.arange(6) % 3, features, paths)
    out = tmp_path / "gallery"
    assert main(["report", str(a), "--out", str(out), "--quiet"]) == 0
    assert main(["report", str(a), "--out", str(out), "--quiet"]) == 0   # its own: redrawn
    assert main(["report", str(b), "--out", str(out), "--quiet"]) == 2
    assert f"holds the report of another run ({a}); pass --overwrite" in capsys.readouterr().err
    assert [row[1] for row in _assignments(out)[1:]] == [str(i % 2) for i in range(6)]   # A's, untouched
    assert main(["report", str(b), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert [row[1] for row in _assignments(out)[1:]] == [str(i % 3) for i in range(6)]
    with pytest.raises(ValueError, match=re.escape(f"holds the report of another run ({b})")):
        report.write_report(a, out_dir=out)
    # A run's own report folder is its own, wherever the run has moved, given or not.
    report.write_report(a)
    moved = tmp_path / "moved_a"
    a.rename(moved)
    report.write_report(moved)
    report.write_report(moved, out_dir=moved / "report")
    # A run is its folder, through links: `latest` names the run it points to now.
    (tmp_path / "latest").symlink_to(moved)
    shared = tmp_path / "shared"
    report.write_report(tmp_path / "latest", out_dir=shared)
    report.write_report(moved, out_dir=shared)   # the same run by another path
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").symlink_to(b)
    with pytest.raises(ValueError, match="holds the report of another run"):
        report.write_report(tmp_path / "latest", out_dir=shared)


def test_a_redraw_replaces_the_report_whole(tmp_path, monkeypatch):
    # An earlier report with more clusters lost only the pictures it redrew (a stale cluster_002.png stayed), and an
    # interrupted redraw left the earlier page beside new pictures. Now the report is drawn aside and moved in whole.
    rng = np.random.default_rng(0)
    paths = []
    (tmp_path / "images").mkdir()   # (a report beside them, not among them)
    for i in range(12):
        paths.append(tmp_path / "images" / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    features = rng.normal(size=(12, 8)).astype(np.float32)
    run_dir.write_run_dir(tmp_path / "three", np.arange(12) % 3, features, paths)
    run_dir.write_run_dir(tmp_path / "two", np.arange(12) % 2, features, paths)
    out = tmp_path / "page"
    report.write_report(tmp_path / "three", out_dir=out, per_cluster=2)
    assert (out / report.cluster_png_name(2)).is_file()
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(path, *args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(report, "draw_cluster", interrupted)
        with pytest.raises(KeyboardInterrupt):
            report.write_report(tmp_path / "two", out_dir=out, per_cluster=2, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # A hidden file of the folder's owner stays; a link to the folder stays a link (the first staging design
    # deleted the one and replaced the other); a killed drawing's leftover is cleaned up.
    (out / ".htaccess").write_text("keep")
    (out / ".index.html.drawing-dead").mkdir()
    os.utime(out / ".index.html.drawing-dead", (time.time() - 7200,) * 2)
    (out / ".index.html.drawing-live").mkdir()     # another report drawing now: left alone
    (tmp_path / "link").symlink_to(out)
    report.write_report(tmp_path / "two", out_dir=tmp_path / "link", per_cluster=2, overwrite=True)
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [".htaccess", ".index.html.drawing-live", report.ASSIGNMENTS,
                                                     "cluster_000.png", "cluster_001.png", "index.html", "map.png",
                                                     "overview.png"]
    assert [row[1] for row in _assignments(out)[1:]] == [str(i % 2) for i in range(12)]   # the redrawn run's
    (out / ".index.html.drawing-live").rmdir()
    # A folder named like a report file is someone's: refused before the work (a raw IsADirectoryError mid-move,
    # after the page was deleted, before).
    (out / "cluster_007.png").mkdir()
    with pytest.raises(ValueError, match="is not a laic report \\(it holds cluster_007.png\\)"):
        report.write_report(tmp_path / "two", out_dir=out, per_cluster=2)
    assert (out / "index.html").is_file()
    # A first drawing that fails leaves no empty folder behind.
    with monkeypatch.context() as patch:
        patch.setattr(report, "draw_cluster", interrupted)
        with pytest.raises(KeyboardInterrupt):
            report.write_report(tmp_path / "two", out_dir=tmp_path / "fresh", per_cluster=2)
    assert not (tmp_path / "fresh").exists()


def test_write_run_dir_publishes_a_whole_run_and_never_writes_into_other_files(cifar, tmp_path):
    # A data set's folder lost its true labels.npy to the clustering, without a word.
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "labels.npy", cifar["truth"])
    with pytest.raises(ValueError, match="run_dir .*data: is not empty and is not a laic run"):
        run_dir.write_run_dir(data, cifar["clusters"], cifar["features"], cifar["paths"])
    np.testing.assert_array_equal(np.load(data / "labels.npy"), cifar["truth"])
    assert sorted(os.listdir(tmp_path)) == ["data"]   # and no staging folder left beside it
    run = tmp_path / "run"
    run_dir.write_run_dir(run, cifar["clusters"], cifar["features"], cifar["paths"])
    with pytest.raises(ValueError, match="holds an earlier run; pass overwrite=True"):
        run_dir.write_run_dir(run, cifar["truth"], cifar["features"], cifar["paths"])
    np.testing.assert_array_equal(np.load(run / "labels.npy"), cifar["clusters"])
    run_dir.write_run_dir(run, cifar["truth"], cifar["features"], cifar["paths"], overwrite=True)
    np.testing.assert_array_equal(np.load(run / "labels.npy"), cifar["truth"])


def test_a_report_among_the_runs_images_is_refused(cifar, tmp_path):
    # Its PNGs became images of the folder: a later `laic embed` of it counted 66 images for 60.
    run = tmp_path / "run"
    run_dir.write_run_dir(run, cifar["clusters"], cifar["features"], cifar["paths"])
    images = cifar["paths"][0].parent
    for out in (images / "gallery", images / "gallery" / "deeper"):
        with pytest.raises(ValueError, match=f"out_dir \\(--out\\) {re.escape(str(out))}: lies inside "
                                             f"{re.escape(str(images))}, which holds the run's images"):
            report.write_report(run, out_dir=out, per_cluster=2)
        assert not (images / "gallery").exists() and not list(images.glob("*.html"))
    # Images in class subfolders (photos/cat, photos/dog): a report in photos/ lies among them too, and above them
    # run.json's image folder (`laic fit --images DIR`).
    photos = tmp_path / "photos"
    copies = []
    for i, path in enumerate(cifar["paths"]):
        (photos / "deep" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        copies.append(shutil.copy(path, photos / "deep" / f"class{i % 2}" / path.name))
    run = tmp_path / "run2"
    run_dir.write_run_dir(run, cifar["clusters"], cifar["features"], copies)
    with pytest.raises(ValueError, match=f"lies inside {re.escape(str(photos / 'deep'))}, which holds the run's"):
        report.write_report(run, out_dir=photos / "deep" / "gallery", per_cluster=2)
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    (run / "run.json").write_text(json.dumps({**info, "images": "../photos"}))   # relative: to RUN_DIR
    with pytest.raises(ValueError, match=f"lies inside {re.escape(str(run / '..' / 'photos'))}, which holds the"):
        report.write_report(run, out_dir=photos / "gallery", per_cluster=2)
    assert report.write_report(run, out_dir=tmp_path / "gallery", per_cluster=2).is_file()


def test_write_run_dir_keeps_relative_image_paths_findable(cifar, tmp_path, monkeypatch):
    # Paths relative to the current folder were written as they were, then read relative to RUN_DIR: every picture
    # was a grey square.
    monkeypatch.chdir(cifar["paths"][0].parent)
    relative = [p.name for p in cifar["paths"]]
    run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], cifar["features"], relative)
    monkeypatch.chdir(tmp_path)
    assert run_dir.read_run(tmp_path / "run").image_paths == cifar["paths"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.write_report(tmp_path / "run", per_cluster=2)


@pytest.mark.parametrize("spoil, match", [
    ("newline", r"image_paths\[5\] .* holds a line break"),
    ("carriage return", r"image_paths\[5\] .* holds a line break"),
    ("nan", r"features: 1 of 60 row\(s\) contain NaN or infinite values: rows 5;"),
    ("zero", r"features: 1 of 60 row\(s\) are all zeros .*: rows 5;"),
])
def test_write_run_dir_refuses_what_the_report_could_not_read(spoil, match, cifar, tmp_path):
    # Each was written, and the report then failed on it (blaming --features, or counting one path too many).
    features, paths = cifar["features"].copy(), list(cifar["paths"])
    if spoil == "newline":
        paths[5] = tmp_path / "a\nb.png"
    elif spoil == "carriage return":   # images.txt's lines lose a trailing CR (laic.io.read_lines): another file
        paths[5] = tmp_path / "b.png\r"
    else:
        features[5] = np.nan if spoil == "nan" else 0.0
    with pytest.raises(ValueError, match=match):
        run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], features, paths)
    assert not (tmp_path / "run").exists()


def test_write_run_dir_keeps_the_features_as_given(cifar, tmp_path):
    # Checked as the fit checks images, but stored as given (float64 rows came out rescaled by powers of two);
    # float64 rows beyond float32's range as their exactly rescaled directions, all the report uses.
    features = cifar["features"].astype(np.float64) * 0.1
    run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], features, cifar["paths"])
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "features.npy"), features.astype(np.float32))
    run_dir.write_run_dir(tmp_path / "far", cifar["clusters"], features * 1e300, cifar["paths"])
    far = np.load(tmp_path / "far" / "features.npy")
    assert far.dtype == np.float32 and np.isfinite(far).all()
    np.testing.assert_allclose(far / np.linalg.norm(far, axis=1, keepdims=True),
                               features / np.linalg.norm(features, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)


def test_a_runs_own_features_are_named_as_such_in_its_errors(cifar, tmp_path, capsys):
    run_dir.write_run_dir(tmp_path / "run", cifar["clusters"], cifar["features"], cifar["paths"])
    spoilt = cifar["features"].copy()
    spoilt[3] = np.nan
    np.save(tmp_path / "run" / "features.npy", spoilt)
    assert main(["report", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "RUN_DIR's " in err and "row(s) contain NaN" in err and "--features" not in err, err


@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_typical_members_and_the_map_at_any_row_scale(scale):
    # float64 rows of 1e300 overflowed np.linalg.norm (1e-300 underflowed): every unit row was 0, the map one point
    # and the typical members the first in index order.
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 8))
    labels = rng.integers(0, 3, size=40)
    for c in range(3):
        assert list(report.typical_members(features * scale, labels, c, 5)) == \
            list(report.typical_members(features, labels, c, 5))
    np.testing.assert_allclose(np.abs(report.map_coordinates(features * scale)),
                               np.abs(report.map_coordinates(features)), atol=1e-12)


def test_the_page_is_named_after_the_run_folder_and_is_valid_utf8(cifar, tmp_path, monkeypatch):
    # `laic report .` titled the page "laic clusters: " (the name of "."), and a folder name that is not UTF-8
    # wrote its raw bytes into a page that says charset utf-8.
    run = tmp_path / os.fsdecode(b"run\xff")
    run_dir.write_run_dir(run, cifar["clusters"], cifar["features"], cifar["paths"])
    monkeypatch.chdir(run)
    index = report.write_report(".", out_dir=tmp_path / "page", per_cluster=2)
    page = index.read_bytes().decode("utf-8")   # strict
    assert "<h1>laic clusters: run\ufffd</h1>" in page
    (tmp_path / "latest").symlink_to(run)   # a run reached through a link is named as the user names it
    index = report.write_report(tmp_path / "latest", out_dir=tmp_path / "page2", per_cluster=2)
    assert "<h1>laic clusters: latest</h1>" in index.read_text()


def _small_run(tmp_path, n=8, k=2, dim=16, images="pics", run="run"):
    """A write_run_dir run of ``n`` tiny images in tmp_path/``images``, its features random."""
    (tmp_path / images).mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(tmp_path / images / f"{i}.png")
        Image.new("RGB", (8, 8), (i * 30 % 256, 0, 0)).save(paths[-1])
    features = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    run_dir.write_run_dir(tmp_path / run, np.arange(n) % k, features, paths)
    return tmp_path / run, paths, features


def test_features_given_for_a_run_that_holds_its_own_must_be_those(tmp_path, capsys):
    # A run holding features.npy (write_run_dir, `laic fit --images`) records no fingerprint: any N rows given with
    # --features, even 3 wide for the run's 16, replaced its own, and its images were drawn under other rows.
    run, _, features = _small_run(tmp_path)
    np.save(tmp_path / "other.npy", np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32))
    np.save(tmp_path / "shuffled.npy", features[::-1])
    np.save(tmp_path / "wider.npy", features.astype(np.float64))   # the same values: said so ("other rows" before)
    for other, unlike in (("other.npy", "these are 8 x 3 float32"), ("shuffled.npy", "these hold other values"),
                          ("wider.npy", "these are 8 x 16 float64")):
        assert main(["report", str(run), "--out", str(tmp_path / "page"), "--features", str(tmp_path / other)]) == 2
        err = capsys.readouterr().err
        assert f"--features {tmp_path / other}: are not the features this run holds ({run / 'features.npy'}: " \
               f"8 x 16 float32; {unlike}); leave --features out" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "page").exists()
    np.save(tmp_path / "same.npy", features)   # the run's own, copied: drawn as they are
    assert report.write_report(run, out_dir=tmp_path / "page", features=tmp_path / "same.npy", per_cluster=2).is_file()


def test_the_default_report_folder_among_the_images_is_refused(tmp_path, capsys):
    # write_run_dir("photos/run") (or `laic fit --features CACHE --out photos/run`): RUN_DIR/report was drawn
    # among the images without a check, where a later `laic embed photos` took its PNGs for images; the same
    # folder given as --out was refused.
    run, paths, _ = _small_run(tmp_path, run="pics/run")
    assert main(["report", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"RUN_DIR {run}: its report folder {run / 'report'} lies inside {tmp_path / 'pics'}, which holds the " \
           "run's images" in err and "pass out_dir (--out) a folder outside it" in err
    assert not (run / "report").exists()
    assert main(["report", str(run), "--out", str(tmp_path / "page"), "--quiet"]) == 0


def test_images_scattered_under_the_home_folder_do_not_forbid_a_report_there(tmp_path, monkeypatch):
    # Images in ~/Pictures and ~/Downloads lie under ~ alone: ~/gallery is among no images' folder, yet it was
    # refused as lying inside ~ (as it is, still, inside an image folder below ~).
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    paths = []
    for i, sub in enumerate(["Pictures", "Downloads"] * 3):
        (home / sub).mkdir(parents=True, exist_ok=True)
        paths.append(home / sub / f"{i}.png")
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(paths[-1])
    run = home / "runs" / "r1"
    run_dir.write_run_dir(run, np.arange(6) % 2, np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32),
                          paths)
    assert report.write_report(run, out_dir=home / "gallery", per_cluster=2).is_file()
    run_dir.write_run_dir(home / "runs" / "r2", np.arange(3) % 2, np.ones((3, 16), np.float32), paths[::2])
    with pytest.raises(ValueError, match=f"lies inside {re.escape(str(home / 'Pictures'))}, which holds the run's"):
        report.write_report(home / "runs" / "r2", out_dir=home / "Pictures" / "gallery", per_cluster=2)


def test_a_file_given_as_run_dir_is_named_as_run_dir(tmp_path, capsys):
    # `laic report runs/r1/labels.npy` said "out_dir (--out) runs/r1/labels.npy/report/index.html: ... is a file":
    # the report's folder was checked before the run was read.
    run, _, _ = _small_run(tmp_path)
    assert main(["report", str(run / "labels.npy")]) == 2
    err = capsys.readouterr().err
    assert f"RUN_DIR {run / 'labels.npy'}: no labels.npy there" in err and f"takes the run's folder ({run})" in err
    assert "--out" not in err and "--pred" not in err   # (`laic evaluate --run` alone has a --pred)


def test_assignments_list_the_same_absolute_paths_from_any_folder(tmp_path, monkeypatch):
    # images.txt written by hand with paths relative to RUN_DIR (as the run folder's doc defines them): the CSV
    # listed them relative to wherever `laic report` ran ("run/../pics/0.png" from tmp_path), wrong from elsewhere.
    run, paths, _ = _small_run(tmp_path)
    (run / "images.txt").write_text("".join(f"../pics/{p.name}\n" for p in paths))
    (tmp_path / "elsewhere").mkdir()
    listed = []
    for where, run_as_typed in ((tmp_path, "run"), (tmp_path / "elsewhere", "../run")):
        monkeypatch.chdir(where)
        index = report.write_report(run_as_typed, out_dir=tmp_path / "page", per_cluster=2)
        listed.append([row[0] for row in _assignments(index.parent)[1:]])
    assert listed[0] == [str(tmp_path / "run" / ".." / "pics" / p.name) for p in paths]
    assert listed[1] == [str(tmp_path / "elsewhere" / ".." / "run" / ".." / "pics" / p.name) for p in paths]
    assert all(os.path.samefile(a, b) for a, b in zip(*listed))


@pytest.mark.parametrize("damaged, content, why", [
    ("clusters.json", {"k": 2, "clusters": [{"names": ["cat"]}]}, 'an entry of its "clusters" has no "cluster"'),
    ("clusters.json", {"k": 2, "clusters": [{"cluster": 5}]}, 'a "cluster" is 5, not a cluster id from 0 to 1'),
    ("clusters.json", {"k": 2, "clusters": [{"cluster": 2}]}, 'a "cluster" is 2, not a cluster id from 0 to 1'),
    ("clusters.json", {"k": 2, "clusters": [{"cluster": True}]}, 'a "cluster" is True, not a cluster id from 0 to 1'),
    ("clusters.json", {"k": 2, "clusters": [{"cluster": 0, "names": "cat"}]},
     'the "names" of cluster 0 are not a list of nouns'),
    ("clusters.json", {"k": "two"}, "its \"k\" is 'two', not a number of clusters"),
    ("clusters.json", [], "not a JSON object"),
    ("run.json", [], "not a JSON object"),
    ("run.json", {"images": 5}, 'its "images" is not a path'),
    ("run.json", {"features_fingerprint": "abc"}, 'its "features_fingerprint" is not'),
    ("run.json", {"features_fingerprint": {"shape": [8], "dtype": "float32", "sha256": "0" * 64}},
     'its "features_fingerprint" is not'),
])
def test_a_run_folder_of_json_in_another_shape_is_a_one_line_error(damaged, content, why, tmp_path, capsys):
    # Tracebacks before (status 1): KeyError, IndexError, AttributeError, TypeError from deep in the report.
    run, _, _ = _small_run(tmp_path)
    (run / damaged).write_text(json.dumps(content))
    assert main(["report", str(run), "--out", str(tmp_path / "page")]) == 2
    err = capsys.readouterr().err
    assert f"{run / damaged}: damaged, not what laic writes there ({why}" in err and len(err.splitlines()) == 1


def test_cluster_pictures_show_each_image_at_its_size(tmp_path):
    # Sized in inches as pixels / 72 but saved at 100 dpi: every 96-px thumbnail came out 133 px wide, resampled.
    run, paths, _ = _small_run(tmp_path, n=5, k=1)
    report.draw_cluster(tmp_path / "cluster.png", paths, {"cluster": 0, "names": ["thing"], "size": 5})
    grid = report.mosaic([report._thumbnail(p) for p in paths], 4)
    with Image.open(tmp_path / "cluster.png") as image:
        drawn = np.asarray(image.convert("RGB"))
    assert drawn.shape[1] == 4 * report.THUMB_PX + 3 * 4   # a row of 4, 4 px apart
    np.testing.assert_array_equal(drawn[-len(grid):], grid)   # pixel for pixel, below the title


def test_matplotlib_says_nothing_of_a_config_folder_it_cannot_make(tmp_path):
    # HOME not a folder: matplotlib made a temporary config folder and printed two lines about it (and its font cache)
    # on stderr, under --quiet too.
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env["HOME"] = os.devnull
    done = subprocess.run([sys.executable, "-c", "from laic import report; report._figure()"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("per_cluster", [0, 1025, True, 2.0])
def test_per_cluster_outside_1_to_1024_is_refused_by_name(per_cluster, tmp_path):
    with pytest.raises(ValueError, match=r"per_cluster \(--per-cluster\) must be an int between 1 and 1024"):
        report.write_report(tmp_path / "run", per_cluster=per_cluster)


def test_a_report_that_cannot_be_written_names_its_folder_as_the_user_knows_it(tmp_path, capsys, monkeypatch):
    # A full disk named the hidden drawing folder, gone after the failure; a read-only run named "out_dir (--out)",
    # which was not given.
    import errno

    run, _, _ = _small_run(tmp_path)

    def disk_full(folder, *args):
        raise io.write_error(folder / "cluster_000.png", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(report, "_draw", disk_full)
    assert main(["report", str(run), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"laic report: error: cannot write {run / 'report' / 'cluster_000.png'}: No space left on "
                          "device"), err
    assert err.endswith(f"({run / 'report'} is as it was)\n") and ".drawing-" not in err
    assert not (run / "report").exists()
    monkeypatch.undo()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(run) and real_access(path, mode))
    assert main(["report", str(run), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"laic report: error: the report folder (RUN_DIR/report; another with "
                                              f"out_dir, --out) {run / 'report' / 'index.html'}: cannot write in {run}")


def test_a_stop_while_the_report_is_moved_in_waits_for_the_whole_report(tmp_path, monkeypatch, capsys,
                                                                        ctrl_c_as_a_terminal_gives_it):
    # A Ctrl-C between the moves left the earlier pictures beside new ones and no page, and laic report said "no
    # file was left half-written" (a QA helper's find, 12-07). Now the stop waits for the moves, and is said so.
    import signal

    run, _, _ = _small_run(tmp_path, n=9, k=3)
    assert main(["report", str(run), "--per-cluster", "2", "--quiet"]) == 0
    capsys.readouterr()
    real_replace, moves = os.replace, []

    def stopped_at_the_first_move(src, dst):
        if pathlib.Path(dst).parent == run / "report":    # a move in (the drawing's own writes go to its staging)
            moves.append(dst)
            if len(moves) == 1:
                signal.raise_signal(signal.SIGINT)
        real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", stopped_at_the_first_move)
    assert main(["report", str(run), "--per-cluster", "3", "--quiet", "--overwrite"]) == 130
    monkeypatch.undo()
    assert capsys.readouterr().err.strip() == (f"laic report: interrupted after the report was written: "
                                               f"{run / 'report' / 'index.html'} is complete")
    page = (run / "report" / "index.html").read_text()
    assert len(moves) > 3
    assert {p.name for p in (run / "report").iterdir() if p.suffix == ".png"} == _referenced(page)


def test_a_stop_before_the_command_looked_at_the_report_does_not_call_an_earlier_one_new(tmp_path):
    # Ctrl-C in the imports before run() noted the earlier page's stamp: that page was said "complete" as if written.
    import argparse

    from laic.commands import report as command

    (tmp_path / "run" / "report").mkdir(parents=True)
    (tmp_path / "run" / "report" / "index.html").write_text("earlier")
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), out=None)
    assert command.interrupted(args) == "interrupted; no file was left half-written, and an earlier report is as it was"
