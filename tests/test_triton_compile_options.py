"""Every Triton launch asks for laic's compile options (laic_kernels.triton.COMPILE_OPTIONS) instead of leaving them
to Triton's defaults: 3.9 warns on a process's first compile that 3.10 turns FP fusion off, which would change the
kernels' arithmetic from the one they were tuned and measured with."""
import pytest
import torch

import laic_kernels
from laic_kernels.backends import triton_interpreting
from laic_kernels.triton import COMPILE_OPTIONS

triton = pytest.importorskip("triton")


@pytest.fixture
def launches(monkeypatch):
    """The keyword arguments of every kernel launch (compiled, or through the interpreter on a CPU)."""
    from triton.runtime import interpreter, jit

    seen = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        def recording(self, *args, _run=cls.run, **kwargs):
            seen.append((getattr(self, "__name__", repr(self)), kwargs))
            return _run(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", recording)
    return seen


def _unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


OPS = {
    "similarity_topk": lambda: laic_kernels.similarity_topk(_unit(37, 24, 0), _unit(53, 24, 1), 5),
    "semantic_mix": lambda: laic_kernels.semantic_mix(_unit(37, 24, 0), _unit(53, 24, 1), 0.05),
    "semantic_mix topk": lambda: laic_kernels.semantic_mix(_unit(37, 24, 0), _unit(53, 24, 1), 0.05, topk=4),
    "consistent_neighbours": lambda: laic_kernels.consistent_neighbours(_unit(37, 24, 0), _unit(37, 16, 1), 5),
    "consistency_loss": lambda: laic_kernels.consistency_loss(
        *(torch.randn(33, 7, generator=torch.Generator().manual_seed(s)).requires_grad_() for s in range(4)),
        _unit(33, 24, 4).requires_grad_(), _unit(33, 24, 5).requires_grad_())[0].backward(),
}


@pytest.mark.parametrize("op", list(OPS))
def test_every_launch_passes_the_compile_options(op, device, launches):
    if device.type == "cpu" and not triton_interpreting():
        pytest.skip("Triton runs on the CPU only through its interpreter (TRITON_INTERPRET=1)")
    with torch.device(device), laic_kernels.use_backend("triton"):
        OPS[op]()
    assert launches, "no Triton kernel ran"
    for kernel, kwargs in launches:
        assert {key: kwargs.get(key) for key in COMPILE_OPTIONS} == COMPILE_OPTIONS, kernel
