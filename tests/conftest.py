"""Test-wide switches. The Triton interpreter must be chosen before triton is first imported, so it is set here, in
one place: on a machine without CUDA every Triton kernel runs on CPU tensors through TRITON_INTERPRET=1.

The real CLIP features (``laic.runtime.data_dir``: $LAIC_DATA, or ``--laic-data PATH``, else shared/data/clip-vit-b32
beside the checkout) are optional: tests that need them skip through :func:`skip_without_data`, and the summary says
once, at its top, how many skipped and how to point them at the folder."""
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# (laic_kernels.triton mends the interpreter of Triton before 3.7 for numpy 2.4 on import: tests need nothing more.)

import pytest  # noqa: E402

from laic.runtime import DATA_ENV, data_dir  # noqa: E402

NO_DATA = "no real CLIP features"  # every skip for want of them says this, and the summary counts them by it

# Devices every kernel is tested on: the CPU (Triton through its interpreter), and CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_addoption(parser):
    parser.addoption("--laic-data", metavar="PATH", help=f"the folder of real CLIP features (clip-vit-b32) the tests "
                     f"may read; default ${DATA_ENV}, else ../shared/data/clip-vit-b32 beside the checkout")


def pytest_configure(config):
    if config.getoption("--laic-data"):
        # Through the environment, so helpers, benchmarks and subprocesses of the tests see it too.
        os.environ[DATA_ENV] = str(pathlib.Path(config.getoption("--laic-data")).expanduser().resolve())


def skip_without_data(path: pathlib.Path) -> pathlib.Path:
    """``path`` (inside the data folder) when it exists; otherwise skip the calling test, saying so."""
    if not path.exists():
        pytest.skip(f"{NO_DATA} ({path} is missing)")
    return path


@pytest.fixture(scope="session")
def shared_data():
    """The real CLIP ViT-B/32 feature sets; tests that need them skip cleanly where the folder is absent."""
    return skip_without_data(data_dir())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and NO_DATA in str(r.longrepr[-1])]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} test(s) skipped: {NO_DATA} at {data_dir()}; point them at the clip-vit-b32 folder with "
            f"{DATA_ENV}=PATH or pytest --laic-data PATH", yellow=True, bold=True)
    return (yield)


@pytest.fixture
def ctrl_c_as_a_terminal_gives_it():
    """SIGINT as Python sets it up in a terminal (a KeyboardInterrupt): a test run started as a background job of a
    non-interactive shell (CI's, nohup) inherits SIGINT ignored, and a command then keeps ignoring it."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


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
