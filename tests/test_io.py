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
