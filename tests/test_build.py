"""setup.py's choices, tested without building: whether the CUDA kernels are built, where the toolkit is, where the
objects persist. Importing setup.py runs nothing (setup() runs only as __main__)."""
import importlib.util
import os

import pytest

SETUP_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("laic_setup", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOLKIT = "/usr/local/cuda-13.0"


@pytest.mark.parametrize("flag", ["", None, " "])
@pytest.mark.parametrize("cuda_home, torch_cuda, gpu_visible, expected", [
    (TOOLKIT, "13.0", True, True),
    (TOOLKIT, "13.0", False, False),  # a CUDA torch on a machine with no GPU: the CPU build, no 5-minute nvcc run
    (TOOLKIT, None, True, False),  # a toolkit beside a CPU-only torch (issue 11): CUDAExtension would fail
    (TOOLKIT, None, False, False),
    (None, "13.0", True, False),
    (None, None, False, False),
])
def test_unset_flag_builds_cuda_only_when_everything_is_there(setup_py, flag, cuda_home, torch_cuda, gpu_visible,
                                                              expected):
    build, reason = setup_py.decide_cuda(flag, cuda_home, torch_cuda, gpu_visible)
    assert build is expected
    if not expected:
        assert "LAIC_BUILD_CUDA=1" in reason


@pytest.mark.parametrize("cuda_home, torch_cuda, gpu_visible, named", [
    (None, "13.0", True, "no CUDA toolkit"),
    (TOOLKIT, None, True, "CPU-only"),
    (TOOLKIT, "13.0", False, "sees no GPU"),
])
def test_skipping_says_what_is_missing(setup_py, cuda_home, torch_cuda, gpu_visible, named):
    build, reason = setup_py.decide_cuda("", cuda_home, torch_cuda, gpu_visible)
    assert not build and named in reason


@pytest.mark.parametrize("cuda_home, torch_cuda, gpu_visible", [
    (TOOLKIT, "13.0", True), (TOOLKIT, "13.0", False), (None, None, True), (TOOLKIT, None, False)])
def test_flag_0_never_builds_cuda(setup_py, cuda_home, torch_cuda, gpu_visible):
    assert setup_py.decide_cuda("0", cuda_home, torch_cuda, gpu_visible) == (False, "LAIC_BUILD_CUDA=0")


@pytest.mark.parametrize("gpu_visible", [True, False])
def test_flag_1_builds_cuda_without_a_gpu(setup_py, gpu_visible):
    build, reason = setup_py.decide_cuda("1", TOOLKIT, "13.0", gpu_visible)
    assert build and "LAIC_BUILD_CUDA=1" in reason


@pytest.mark.parametrize("cuda_home, torch_cuda, named", [
    (TOOLKIT, None, r"torch is a CPU-only build"),
    (None, "13.0", r"no CUDA toolkit was found \(set CUDA_HOME"),
    (None, None, r"no CUDA toolkit.*; and torch is a CPU-only build"),
])
def test_flag_1_fails_clearly_when_it_cannot_be_met(setup_py, cuda_home, torch_cuda, named):
    with pytest.raises(RuntimeError, match=r"LAIC_BUILD_CUDA=1 asks for the CUDA kernels, but " + named):
        setup_py.decide_cuda("1", cuda_home, torch_cuda, True)


@pytest.mark.parametrize("flag", ["yes", "true", "2", "on"])
def test_other_flags_are_refused(setup_py, flag):
    with pytest.raises(ValueError, match="LAIC_BUILD_CUDA must be 0, 1 or unset"):
        setup_py.decide_cuda(flag, TOOLKIT, "13.0", True)


def _fake_toolkit(root, nvcc=True, cudart="lib64/libcudart.so"):
    if nvcc:
        os.makedirs(os.path.join(root, "bin"))
        open(os.path.join(root, "bin", "nvcc"), "w").close()
    if cudart:
        os.makedirs(os.path.dirname(os.path.join(root, cudart)))
        open(os.path.join(root, cudart), "w").close()
    return str(root)


def test_find_cuda_home_needs_nvcc_and_cudart(setup_py, tmp_path):
    wrapper_only = _fake_toolkit(tmp_path / "wrapper", cudart=None)  # like a `nvcc` script on PATH
    no_nvcc = _fake_toolkit(tmp_path / "runtime", nvcc=False)
    real = _fake_toolkit(tmp_path / "cuda-13.0", cudart="targets/x86_64-linux/lib/libcudart.so.13")
    assert setup_py.find_cuda_home([None, wrapper_only, no_nvcc]) is None
    assert setup_py.find_cuda_home([None, wrapper_only, no_nvcc, real]) == os.path.realpath(real)


def test_find_cuda_home_resolves_links(setup_py, tmp_path):
    real = _fake_toolkit(tmp_path / "cuda-13.0")
    os.symlink(real, tmp_path / "cuda")
    assert setup_py.find_cuda_home([str(tmp_path / "cuda")]) == os.path.realpath(real)


def test_objects_persist_in_the_repo_one_folder_per_variant(setup_py):
    cpu, cuda = setup_py.build_folder(False), setup_py.build_folder(True)
    repo = os.path.dirname(SETUP_PY)
    assert cpu != cuda
    for folder in (cpu, cuda):
        # under build/, which .gitignore ignores, and not in a temporary folder that pip deletes
        assert os.path.commonpath([folder, os.path.join(repo, "build")]) == os.path.join(repo, "build")
