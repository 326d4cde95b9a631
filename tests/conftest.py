"""Test-wide switches. The Triton interpreter must be chosen before triton is first imported, so it is set here, in
one place: on a machine without CUDA every Triton kernel runs on CPU tensors through TRITON_INTERPRET=1."""
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clip-vit-b32"

# Devices every kernel is tested on: the CPU (Triton through its interpreter), and CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def shared_data():
    """The real CLIP ViT-B/32 feature sets; tests that need them skip cleanly where the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real CLIP features not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on the 2-core CI machine two threads fight over the cores with the other
    suites and a tiny ViT step gets ~10x slower; one thread is also what DataLoader workers use."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` filled with NaN (or -1 for integer tensors), to hand kernels as their output buffer so
    that an element a kernel fails to write cannot pass a comparison."""
    return torch.full_like(t, float("nan") if t.is_floating_point() else -1)
