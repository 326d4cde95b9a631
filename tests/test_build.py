"""setup.py's choices, tested without building: whether the CUDA kernels are built, where the toolkit is, where the
objects persist. Importing setup.py runs nothing (setup() runs only as __main__)."""
import glob as glob_module
import importlib.util
import os
import subprocess
import sys
import tarfile
import warnings

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


def test_toolkit_version_from_version_json_or_nvcc(setup_py, tmp_path):
    with_json = tmp_path / "json"
    with_json.mkdir()
    (with_json / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.4.1"}}')
    assert setup_py.toolkit_version(str(with_json)) == "12.4"
    nvcc_only = tmp_path / "nvcc"
    (nvcc_only / "bin").mkdir(parents=True)
    (nvcc_only / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 11.8, V11.8.89'\n")
    (nvcc_only / "bin" / "nvcc").chmod(0o755)
    assert setup_py.toolkit_version(str(nvcc_only)) == "11.8"
    assert setup_py.toolkit_version(str(tmp_path / "nothing")) is None


def test_a_toolkit_of_another_major_version_than_torchs_is_skipped_or_refused(setup_py):
    # torch's build refuses the pair ("The detected CUDA version (12.4) mismatches ..."): the whole install failed,
    # where laic runs without these kernels.
    build, reason = setup_py.decide_cuda("", TOOLKIT, "13.0", True, None, "12.4")
    assert not build and f"the toolkit {TOOLKIT} is CUDA 12.4 but torch was built with CUDA 13.0" in reason
    with pytest.raises(RuntimeError, match="set CUDA_HOME to a CUDA 13 toolkit"):
        setup_py.decide_cuda("1", TOOLKIT, "13.0", False, None, "12.4")
    assert setup_py.decide_cuda("", TOOLKIT, "13.0", True, None, "13.1")[0]   # minor versions may differ


def test_the_architectures_are_the_visible_gpus_or_ampere_hopper_and_ptx(setup_py):
    # "8.0;9.0" always, before: no kernel for a T4 (7.5) or a Blackwell card on the machine that built it.
    assert setup_py.default_arch_list(True) is None          # torch's choice: the visible GPUs', with PTX
    assert setup_py.default_arch_list(False) == "8.0;9.0+PTX"


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


def test_a_cuda_home_that_holds_no_toolkit_is_not_replaced_by_another(setup_py, tmp_path, monkeypatch):
    """A CUDA_HOME the user set is the only folder tried: before, a missing one fell through to /usr/local/cuda-*
    and the build said it used that toolkit."""
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    installed, real_glob = _fake_toolkit(tmp_path / "cuda-13.0"), glob_module.glob
    monkeypatch.setattr(glob_module, "glob", lambda pattern: [installed] if pattern == "/usr/local/cuda-*"
                        else real_glob(pattern))
    monkeypatch.delenv("CUDA_HOME")
    assert setup_py.find_cuda_home() is not None        # unset: /usr/local/cuda, else the (fake) /usr/local/cuda-*
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    assert setup_py.find_cuda_home() is None
    with pytest.raises(RuntimeError, match=r"CUDA_HOME=.*missing holds no CUDA toolkit .*point it at the toolkit"):
        setup_py.decide_cuda("1", None, "13.0", True, str(tmp_path / "missing"))
    build, reason = setup_py.decide_cuda("", None, "13.0", True, str(tmp_path / "missing"))
    assert not build and "missing holds no CUDA toolkit" in reason
    monkeypatch.setenv("CUDA_HOME", _fake_toolkit(tmp_path / "mine"))
    assert setup_py.find_cuda_home() == os.path.realpath(tmp_path / "mine")


def test_without_ninja_every_build_recompiles(setup_py, monkeypatch):
    """setuptools' own up-to-date check (torch's fallback without ninja) compares the .cpp/.cu files' times with the
    library's only: it kept a stale library after a header or torch change. Without ninja the build is forced."""
    from setuptools import Distribution
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    command = setup_py.build_ext_command(False)(Distribution({"ext_modules": [setup_py.extension(False)]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # torch's "falling back to the slow distutils backend"
        command.finalize_options()
    assert command.force     # (with ninja, torch forces the build itself: ninja then skips what is up to date)
    assert command.build_temp == setup_py.build_folder(False)


def test_a_missing_compiler_or_python_headers_is_named_before_building(setup_py, tmp_path, monkeypatch):
    """Without g++ or Python.h torch's build failed after a long compile log, its cause one line in the middle."""
    (tmp_path / "Python.h").write_text("")
    assert setup_py.missing_build_tools(sys.executable, str(tmp_path)) == []
    no_compiler, = setup_py.missing_build_tools("no-such-cxx-laic -O2", str(tmp_path))
    assert "'no-such-cxx-laic' is not on PATH" in no_compiler and "CXX" in no_compiler
    no_headers, = setup_py.missing_build_tools(sys.executable, str(tmp_path / "none"))
    assert "Python.h is missing" in no_headers and "-dev" in no_headers
    assert len(setup_py.missing_build_tools("no-such-cxx-laic", str(tmp_path / "none"))) == 2

    from setuptools import Distribution
    monkeypatch.setenv("CXX", "no-such-cxx-laic")
    command = setup_py.build_ext_command(False)(Distribution({"ext_modules": [setup_py.extension(False)]}))
    command.finalize_options()
    with pytest.raises(SystemExit, match="cannot build its C\\+\\+ extension laic_kernels._C: no C\\+\\+ compiler"):
        command.run()


def test_the_sdist_holds_every_tracked_source_and_test(tmp_path):
    """The sdist held only the .cpp files setup.py lists: no header (its build failed), no .cu where it was made
    without CUDA, none of the tests' helper modules. Compared with git's list of tracked files."""
    repo = os.path.dirname(SETUP_PY)
    try:
        tracked = subprocess.run(["git", "ls-files", "csrc", "laic", "laic_kernels", "tests", "benchmarks"], cwd=repo,
                                 capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    env = {**os.environ, "LAIC_BUILD_CUDA": "0"}
    # A fresh egg-info folder: setuptools adds the files listed in an existing one's SOURCES.txt (an earlier build's).
    (tmp_path / "egg").mkdir()
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path / "egg"), "sdist", "-d",
                    str(tmp_path)], cwd=repo, env=env, check=True, capture_output=True)
    (archive,) = tmp_path.glob("laic-*.tar.gz")
    with tarfile.open(archive) as sdist:
        held = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"csrc/sinkhorn.h", "csrc/cuda/sinkhorn_cuda.cu", "tests/conftest.py"} <= set(tracked)
    assert set(tracked) - held == set()


def test_the_extension_is_built_and_loads():
    """The README's commands build laic_kernels._C: its tests must not skip for want of it (a missing or broken
    library made 104 of them skip, and the suite pass)."""
    from laic_kernels.backends import extension_import_error

    assert extension_import_error() is None


def test_an_unloadable_extension_is_told_from_a_missing_one(monkeypatch):
    """A library that is there but fails to load was reported as "not built (file too short)"."""
    import importlib.util
    from laic_kernels import backends

    real_find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "laic_kernels.extension", None)       # its import now raises ImportError
    monkeypatch.setattr(backends, "_extension_error", backends._NOT_CHECKED)
    said = backends.extension_import_error()
    assert said.startswith("the compiled extension laic_kernels._C is there but failed to load (ModuleNotFoundError")
    assert "another torch" in said and "--no-build-isolation" in said
    monkeypatch.setattr(backends, "_extension_error", backends._NOT_CHECKED)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "laic_kernels._C" else real_find_spec(name, *args))
    assert backends.extension_import_error().startswith("the compiled extension laic_kernels._C is not built; rebuild")


def test_a_checkout_that_hides_the_installed_extension_says_so(monkeypatch, tmp_path):
    # After `pip install .`, running from the checkout imported its laic_kernels (no _C) ahead of the installed one,
    # and the reason given was "not built; rebuild it": it was built and installed, elsewhere.
    import importlib.metadata
    import importlib.util
    import pathlib

    from laic_kernels import backends

    installed = tmp_path / "site-packages" / "laic_kernels" / "_C.cpython-311-x86_64-linux-gnu.so"
    installed.parent.mkdir(parents=True)
    installed.write_bytes(b"")

    class Recorded(pathlib.PurePosixPath):   # an entry of the distribution's RECORD, as importlib.metadata gives it
        def locate(self):
            return tmp_path / "site-packages" / self

    real_find_spec, real_files = importlib.util.find_spec, importlib.metadata.files
    monkeypatch.setitem(sys.modules, "laic_kernels.extension", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "laic_kernels._C" else real_find_spec(name, *args))
    monkeypatch.setattr(importlib.metadata, "files", lambda name: [Recorded("laic_kernels/__init__.py"),
                                                                   Recorded(f"laic_kernels/{installed.name}")]
                        if name == "laic" else real_files(name))
    monkeypatch.setattr(backends, "_extension_error", backends._NOT_CHECKED)
    said = backends.extension_import_error()
    assert said.startswith(f"laic_kernels was imported from {os.path.dirname(backends.__file__)}, which holds no "
                           f"compiled extension, ahead of the installed laic whose extension is {installed}: run from")
    monkeypatch.setattr(importlib.metadata, "files", lambda name: [])   # an editable install records no _C
    monkeypatch.setattr(backends, "_extension_error", backends._NOT_CHECKED)
    assert backends.extension_import_error().startswith("the compiled extension laic_kernels._C is not built")
