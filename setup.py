"""Builds laic_kernels._C: the batched-Sinkhorn op (CPU always, CUDA when a toolkit is found).

Environment:
  LAIC_BUILD_CUDA=1  force the CUDA build (fails if no toolkit);  =0  skip it;  unset: build when found.
  TORCH_CUDA_ARCH_LIST  defaults to "8.0;9.0" (Ampere, Hopper).
  CUDA_HOME  the toolkit folder; found automatically when unset (a `nvcc` wrapper script on PATH is not enough
             for torch, which would look for cudart next to the wrapper).
"""
import glob
import os

from setuptools import setup


def _find_cuda_home():
    """The real toolkit folder: one holding both bin/nvcc and the cudart library."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in filter(None, candidates):
        root = os.path.realpath(root)
        has_nvcc = os.path.isfile(os.path.join(root, "bin", "nvcc"))
        has_cudart = glob.glob(os.path.join(root, "lib*", "libcudart*")) or glob.glob(
            os.path.join(root, "targets", "*", "lib", "libcudart*"))
        if has_nvcc and has_cudart:
            return root
    return None


def _want_cuda():
    flag = os.environ.get("LAIC_BUILD_CUDA", "").strip()
    cuda_home = _find_cuda_home()
    if flag == "0":
        return None
    if flag == "1" and cuda_home is None:
        raise RuntimeError("LAIC_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit folder")
    return cuda_home


cuda_home = _want_cuda()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# -fno-trapping-math lets GCC turn float compares into max/min and so vectorise the Sinkhorn loops.
extra = {"cxx": ["-O3", "-fopenmp", "-fno-trapping-math"] if os.name != "nt" else ["/O2"]}
if cuda_home:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra["nvcc"] = ["-O3", "-DLAIC_WITH_CUDA"]  # no fast math: the plan must match the reference to 1e-5
    extra["cxx"].append("-DLAIC_WITH_CUDA")
    ext = CUDAExtension("laic_kernels._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
else:
    ext = CppExtension("laic_kernels._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
