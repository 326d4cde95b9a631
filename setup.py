"""Builds laic_kernels._C: the batched-Sinkhorn op, on the CPU always, with its CUDA kernels when wanted, and the
consistency loss with its gradient on the CPU (csrc/consistency_loss.cpp).

Environment:
  LAIC_BUILD_CUDA  unset: the CUDA kernels are built when a toolkit is found, torch is a CUDA build and torch sees a
                   GPU (the reason they were skipped is printed; `pip install -v` shows it);
                   1: always (CI sets it, to prove they compile on a machine with no GPU); an error when no toolkit
                   is found or torch is a CPU-only build;  0: never.
  TORCH_CUDA_ARCH_LIST  unset: torch's own choice where the kernels are built because a GPU is visible (that GPU's
                   architecture, and PTX); "8.0;9.0+PTX" (Ampere, Hopper, and PTX that newer GPUs compile) where
                   LAIC_BUILD_CUDA=1 builds them without one. ("8.0;9.0" before, even with a GPU visible: no kernel
                   for a T4 or a Blackwell card.)
  CUDA_HOME  the toolkit folder; found automatically when unset (a `nvcc` wrapper script on PATH is not enough
             for torch, which would look for cudart next to the wrapper). When set, it is the only folder tried: one
             that holds no toolkit means no CUDA kernels (an error with LAIC_BUILD_CUDA=1), never another toolkit.

An unchanged tree is not recompiled: the objects live in build/laic_ext/<cpu|cuda>/ rather than in the temporary
folder that `pip install -e` gives each build, and ninja recompiles only what changed (a source, a header it
includes, torch's headers, or a compiler flag); the rest of a rebuild is one link. Without ninja every build
recompiles everything: setuptools' own check compares the sources' times with the library's only, so it kept a
stale library after a header, flag or torch change (and after switching LAIC_BUILD_CUDA to 1).

Importing this file builds nothing (tests/test_build.py imports it): setup() runs only as __main__, which is how pip
and `python setup.py` run it.
"""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "laic_kernels._C"


def find_cuda_home(candidates=None):
    """The real toolkit folder, one holding both bin/nvcc and the cudart library, or None. ``candidates`` defaults to
    $CUDA_HOME alone where it is set (the user chose it), else $CUDA_PATH, /usr/local/cuda and /usr/local/cuda-*
    (newest first)."""
    if candidates is None:
        candidates = [os.environ.get("CUDA_HOME")] if os.environ.get("CUDA_HOME") else (
            [os.environ.get("CUDA_PATH"), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for root in filter(None, candidates):
        root = os.path.realpath(root)
        has_nvcc = os.path.isfile(os.path.join(root, "bin", "nvcc"))
        has_cudart = glob.glob(os.path.join(root, "lib*", "libcudart*")) or glob.glob(
            os.path.join(root, "targets", "*", "lib", "libcudart*"))
        if has_nvcc and has_cudart:
            return root
    return None


def toolkit_version(cuda_home):
    """The CUDA version of the toolkit at ``cuda_home`` ("13.0"), from its version.json or `nvcc --version`; None
    where neither says."""
    try:
        with open(os.path.join(cuda_home, "version.json")) as f:
            return ".".join(json.load(f)["cuda"]["version"].split(".")[:2])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        said = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", said)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def decide_cuda(flag, cuda_home, torch_cuda, gpu_visible, cuda_home_set=None, toolkit=None):
    """Whether to build the CUDA kernels, and why: ``(build, reason)``.

    flag: the value of LAIC_BUILD_CUDA ("0", "1", or "" / None when unset); cuda_home: the toolkit folder, None when
    none was found; torch_cuda: torch.version.cuda, None for a CPU-only torch; gpu_visible: torch.cuda.is_available();
    cuda_home_set: $CUDA_HOME as the user set it (named when it holds no toolkit); toolkit: the toolkit's CUDA
    version (:func:`toolkit_version`, None when unknown), whose major version must be torch's (torch's build refuses
    the pair: an install that failed where laic runs without these kernels).
    Raises ValueError for another flag, and RuntimeError when LAIC_BUILD_CUDA=1 cannot be met.
    """
    flag = (flag or "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"LAIC_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, "LAIC_BUILD_CUDA=0"
    missing = []
    if cuda_home is None and cuda_home_set:
        missing.append(f"CUDA_HOME={cuda_home_set} holds no CUDA toolkit (no bin/nvcc with a libcudart beside it); "
                       "point it at the toolkit folder, or unset it to search /usr/local/cuda*")
    elif cuda_home is None:
        missing.append("no CUDA toolkit was found (set CUDA_HOME to the folder holding bin/nvcc and lib64/libcudart)")
    if torch_cuda is None:
        missing.append("torch is a CPU-only build (torch.version.cuda is None; a CUDA build of torch is needed)")
    elif cuda_home is not None and toolkit is not None and toolkit.split(".")[0] != torch_cuda.split(".")[0]:
        missing.append(f"the toolkit {cuda_home} is CUDA {toolkit} but torch was built with CUDA {torch_cuda} (their "
                       f"major versions must match: set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]} toolkit)")
    if flag == "1":
        if missing:
            raise RuntimeError("LAIC_BUILD_CUDA=1 asks for the CUDA kernels, but " + "; and ".join(missing))
        return True, f"LAIC_BUILD_CUDA=1 (toolkit {cuda_home}, torch built with CUDA {torch_cuda})"
    if not gpu_visible:
        missing.append("torch sees no GPU (torch.cuda.is_available() is False)")
    if missing:
        return False, "; ".join(missing) + "; set LAIC_BUILD_CUDA=1 to ask for them"
    return True, f"a GPU is visible (toolkit {cuda_home}, torch built with CUDA {torch_cuda})"


def default_arch_list(gpu_visible):
    """TORCH_CUDA_ARCH_LIST where the user set none: None (torch's choice: the visible GPUs' architectures and PTX)
    with a GPU visible, else Ampere and Hopper with PTX for newer GPUs."""
    return None if gpu_visible else "8.0;9.0+PTX"


def missing_build_tools(compiler=None, python_include=None):
    """What the C++ build needs and this machine lacks, as one message per missing tool ([] when nothing is).

    compiler: the C++ compiler torch will call ($CXX, else ``c++``); python_include: the folder that must hold
    Python.h (this Python's include folder). Checked before building because torch's build, lacking either, fails
    after a long compile log whose cause is one line in the middle of it.
    """
    if compiler is None:
        compiler = os.environ.get("CXX") or "c++"
    if python_include is None:
        python_include = sysconfig.get_paths()["include"]
    missing = []
    words = shlex.split(compiler) if compiler.strip() else ["c++"]
    if shutil.which(words[0]) is None:
        missing.append(f"no C++ compiler: {words[0]!r} is not on PATH (install g++, e.g. `apt-get install g++`, "
                       "or set CXX to your compiler)")
    if not os.path.isfile(os.path.join(python_include, "Python.h")):
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        missing.append(f"no Python headers: {python_include}/Python.h is missing (install them for Python {version}, "
                       f"e.g. `apt-get install python{version}-dev` or `python3-dev`)")
    return missing


def build_folder(with_cuda):
    """Where the objects persist between builds; one folder per variant, so that switching does not rebuild."""
    return os.path.join(HERE, "build", "laic_ext", "cuda" if with_cuda else "cpu")


def main():
    import torch  # not torch.utils.cpp_extension yet: it reads CUDA_HOME when imported

    cuda_home = find_cuda_home()
    gpu_visible = torch.cuda.is_available()
    toolkit = toolkit_version(cuda_home) if cuda_home else None
    with_cuda, reason = decide_cuda(os.environ.get("LAIC_BUILD_CUDA"), cuda_home, torch.version.cuda, gpu_visible,
                                    os.environ.get("CUDA_HOME"), toolkit)
    print(f"laic: {'building' if with_cuda else 'skipping'} the CUDA kernels: {reason}", file=sys.stderr)
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # else torch guesses it from the `nvcc` on PATH, wrongly for a wrapper
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        arch_list = default_arch_list(gpu_visible)
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list

    from setuptools import setup

    setup(ext_modules=[extension(with_cuda)], cmdclass={"build_ext": build_ext_command(with_cuda)})


def build_ext_command(with_cuda):
    """torch's BuildExtension (ninja), its objects kept in build_folder(with_cuda); forced where ninja is missing."""
    from torch.utils.cpp_extension import BuildExtension, is_ninja_available

    class IncrementalBuildExtension(BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            # pip's editable build hands every run a new temporary build_temp, which would recompile everything.
            self.build_temp = build_folder(with_cuda)
            # Without ninja torch falls back to setuptools, whose up-to-date check skips a build whose library is
            # newer than the .cpp/.cu files: a stale library after a header, flag or torch change.
            if not is_ninja_available():
                self.force = True

        def run(self):
            missing = missing_build_tools()
            if missing:  # checked here, not in main(): an sdist or the metadata needs no compiler
                sys.exit(f"laic cannot build its C++ extension {EXTENSION}: " + "; and ".join(missing))
            super().run()

    return IncrementalBuildExtension.with_options(use_ninja=True)


def extension(with_cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets GCC turn float compares into max/min and so vectorise the Sinkhorn loops. -g0 undoes
    # the -g in Python's own CFLAGS: debug info for torch's headers made each object 17 MB and took a third of the
    # compile time (measured on the 2-core dev machine).
    extra = {"cxx": ["-O3", "-g0", "-fopenmp", "-fno-trapping-math"] if os.name != "nt" else ["/O2"]}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "-DLAIC_WITH_CUDA"]  # no fast math: the plan must match the reference to 1e-5
        extra["cxx"].append("-DLAIC_WITH_CUDA")
        return CUDAExtension(EXTENSION, sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    return CppExtension(EXTENSION, sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])


if __name__ == "__main__":
    main()
