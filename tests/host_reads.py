"""Counting the Tensor methods that read values back to the host (each a device synchronisation on CUDA), for tests
that a loop reads nothing per iteration. On the CPU nothing syncs, so these tests count the calls instead."""
import contextlib
import pathlib
import sys

import pytest
import torch

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Code that runs on the GPU as it runs here: laic and the kernels' dispatchers, not the pure-PyTorch references
# (the CPU's stand-ins for the kernels) nor torch itself (e.g. Adam reads its step counters, CPU tensors on CUDA too).
OWN_CODE = (ROOT / "laic", ROOT / "laic_kernels")
REFERENCES = ROOT / "laic_kernels" / "reference"


def own_code(filename: str) -> bool:
    path = pathlib.Path(filename).resolve()
    return any(root in path.parents for root in OWN_CODE) and REFERENCES not in path.parents


@contextlib.contextmanager
def counting_host_reads():
    """``{(method, file, line): calls}`` of the host reads made directly by laic's own code (:func:`own_code`)."""
    counts = {}
    patch = pytest.MonkeyPatch()

    def counted(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if own_code(caller.co_filename):
                where = (name, pathlib.Path(caller.co_filename).name, sys._getframe(1).f_lineno)
                counts[where] = counts.get(where, 0) + 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in SYNCS:
        patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    try:
        yield counts
    finally:
        patch.undo()
