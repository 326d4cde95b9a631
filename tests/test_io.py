"""laic.io: a target is either the old complete file or the new complete file, never a partial one."""
import os

import numpy as np
import pytest

from laic import io


def test_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "a.npy"
    io.save_npy(target, np.arange(5))
    io.save_npy(target, np.arange(7))
    np.testing.assert_array_equal(np.load(target), np.arange(7))
    assert os.listdir(target.parent) == ["a.npy"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert target.read_text() == io.json.dumps({"v": 1}, indent=2, sort_keys=True) + "\n"
    assert os.listdir(tmp_path) == ["a.json"]


def test_without_empty_clusters_renormalises_and_never_divides_by_zero():
    from laic.io import without_empty_clusters

    probs = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [np.nan] * 3, [0.1, 0.9, 0.0]], dtype=np.float32)
    got = without_empty_clusters(probs, [0, 3, 4])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0], [0, 0.3 / 0.8, 0.5 / 0.8], rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0, 0.5, 0.5])      # all its mass on the empty cluster: the others alike
    assert np.isnan(got[2]).all()                              # an unreadable image stays NaN
    np.testing.assert_array_equal(got[3], [0, 1, 0])
    assert without_empty_clusters(probs, [1, 3, 4]) is probs   # nothing empty: untouched
