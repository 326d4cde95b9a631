"""Backend selection for every laic_kernels op.

Each op lists its backends in order of preference. In automatic mode the first one that can take the input runs;
a backend can be forced with the environment variable ``LAIC_KERNELS_BACKEND`` (read at each call) or, taking
precedence, the context manager :func:`use_backend`. A forced backend that cannot take an input raises an error that
says why (xformers-style), instead of silently falling back.

Backend names:
  ``reference``  the pure-PyTorch definition of the op (always available)
  ``triton``     fused Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` and only when forced)
  ``extension``  the compiled C++/CUDA op in ``laic_kernels._C`` (``torch.ops.laic.*``)
  ``symmetric``  the graphs (a set searched among itself) in plain PyTorch with each pair's product computed once
                 (``laic_kernels.symmetric``): the CPU's path, and GPUs' without Triton
  ``closed_form`` consistency_loss as the reference computes it, with its whole gradient written out
                 (``laic_kernels.closed_form``): the CPU's path, and GPUs' without Triton
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

BACKENDS = ("reference", "triton", "extension", "symmetric", "closed_form")
ENV_VAR = "LAIC_KERNELS_BACKEND"

_UNSET = "<unset>"  # no use_backend block is active: the environment variable decides
_forced: contextvars.ContextVar[str] = contextvars.ContextVar("laic_kernels_backend", default=_UNSET)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {', '.join(BACKENDS)} (or 'auto')")
    return name


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``LAIC_KERNELS_BACKEND``, or None in automatic mode."""
    name = _forced.get()
    if name != _UNSET:
        return None if name == "auto" else name
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    return _check_name(env, ENV_VAR)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force ``name`` for every op called inside the block (``None`` or ``"auto"``: automatic selection, whatever
    the environment variable says)."""
    if name is None:
        name = "auto"
    if name != "auto":
        _check_name(name, "use_backend(name)")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


class ForcedBackendError(RuntimeError, ValueError):
    """A forced backend (``use_backend``, ``LAIC_KERNELS_BACKEND``) that the op lacks or that cannot take the input:
    the caller's setting, so a ValueError too (the ``laic`` command says it in one line, not a traceback); a
    RuntimeError as before."""


@dataclass(frozen=True)
class Backend:
    """One way to run an op. ``why_not(*args, forced=..., **kwargs)`` returns None when the backend can take the
    input, else a sentence saying why not; ``run(*args, **kwargs)`` computes the op."""

    name: str
    why_not: Callable[..., Optional[str]]
    run: Callable


_explaining: contextvars.ContextVar[bool] = contextvars.ContextVar("laic_kernels_explaining", default=False)


class _Explained(Exception):
    """Carries :func:`explain`'s answer out of the dispatch the op reached, before any backend runs."""

    def __init__(self, reasons: dict):
        super().__init__()
        self.reasons = reasons


def dispatch(op: str, backends: Sequence[Backend], *args, **kwargs):
    """Run ``op`` on the forced backend, or on the first one that can take the input."""
    if _explaining.get():
        raise _Explained({b.name: b.why_not(*args, forced=False, **kwargs) for b in backends})
    forced = forced_backend()
    if forced is not None:
        for backend in backends:
            if backend.name == forced:
                reason = backend.why_not(*args, forced=True, **kwargs)
                if reason is not None:
                    raise ForcedBackendError(f"{op}: the forced backend {forced!r} cannot take this input: "
                                             f"{reason}")
                return backend.run(*args, **kwargs)
        names = ", ".join(b.name for b in backends)
        raise ForcedBackendError(f"{op} has no {forced!r} backend (it has: {names}); unset {ENV_VAR}, or force it "
                                 "with use_backend around the ops that have it")
    reasons = []
    for backend in backends:
        reason = backend.why_not(*args, forced=False, **kwargs)
        if reason is None:
            return backend.run(*args, **kwargs)
        reasons.append(f"{backend.name}: {reason}")
    raise RuntimeError(f"{op}: no backend can take this input ({'; '.join(reasons)})")


def explain(op: str, *args, **kwargs) -> dict:
    """For each backend of the op that ``laic_kernels.OP`` dispatches to (``op`` e.g. ``"sinkhorn"``; ``knn_graph``
    reaches ``similarity_topk``'s), called with the public function's own arguments: None if the backend would take
    this input in automatic mode, else why not. The op's input checks run as in a call; no backend runs."""
    import importlib

    function = getattr(importlib.import_module(f"laic_kernels.{op}"), op, None)
    if function is None:
        raise ValueError(f"laic_kernels has no op {op!r} to explain; the ops are similarity_topk, knn_graph, "
                         "semantic_mix, consistent_neighbours, consistency_loss and sinkhorn")
    token = _explaining.set(True)
    try:
        function(*args, **kwargs)
    except _Explained as explained:
        return explained.reasons
    finally:
        _explaining.reset(token)
    raise ValueError(f"{op} chose no backend for these arguments")


def always(*args, **kwargs) -> Optional[str]:
    return None


# --------------------------------------------------------------------------------------------------------------------
# Shared availability checks


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_NOT_CHECKED = object()
_triton_error = _NOT_CHECKED


def triton_import_error() -> Optional[str]:
    # A plain module-level cache rather than functools.lru_cache, which torch.compile warns about when tracing.
    global _triton_error
    if _triton_error is _NOT_CHECKED:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_error = None
        except Exception as exc:  # pragma: no cover - depends on the machine
            _triton_error = f"triton cannot be imported ({exc})"
    return _triton_error


def triton_why_not(device: torch.device, forced: bool) -> Optional[str]:
    """Whether Triton kernels can run on ``device``: on CUDA always (when triton imports); on the CPU only through
    the interpreter, and only when forced, because the interpreter is far slower than the reference. The device is
    looked at first: a fit on the CPU never imports triton (0.15 s of a process's first 500-image fit)."""
    if device.type == "cpu" and not triton_interpreting():
        return "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before triton is imported)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels do not run on {device.type} tensors"
    error = triton_import_error()
    if error:
        return error
    if device.type == "cpu" and not forced:
        return "the Triton interpreter on CPU is only used when forced (it is slower than the reference)"
    return None


_extension_error = _NOT_CHECKED


def extension_import_error() -> Optional[str]:
    # A module-level cache, not functools.lru_cache, which torch.compile warns about when tracing (as for Triton).
    global _extension_error
    if _extension_error is _NOT_CHECKED:
        try:
            import laic_kernels.extension  # noqa: F401
            _extension_error = None
        except Exception as exc:
            _extension_error = _extension_problem(exc)
    return _extension_error


def _extension_problem(exc: Exception) -> str:
    """Why laic_kernels._C did not load: not built, or built and unloadable (another torch, a damaged file)."""
    import importlib.util

    rebuild = ("rebuild it: `pip install --no-build-isolation -e .` in a checkout, or `pip install "
               "--no-build-isolation --force-reinstall --no-deps <laic source>`")
    if importlib.util.find_spec("laic_kernels._C") is None:
        installed = _installed_extension()
        if installed is not None:   # a checkout (the current folder) imported in place of the installed package
            here = os.path.dirname(os.path.abspath(__file__))
            return (f"laic_kernels was imported from {here}, which holds no compiled extension, ahead of the "
                    f"installed laic whose extension is {installed}: run from another folder, or install the "
                    "checkout with `pip install --no-build-isolation -e .`")
        return f"the compiled extension laic_kernels._C is not built; {rebuild}"
    return (f"the compiled extension laic_kernels._C is there but failed to load ({type(exc).__name__}: {exc}); it "
            f"may be built against another torch ({torch.__version__} here) or damaged; {rebuild}")


def _installed_extension() -> Optional[str]:
    """The compiled extension of the installed laic distribution (a wheel's or `pip install .`'s), where one is
    installed apart from the laic_kernels that was imported; None otherwise."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("laic") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    for file in files:
        if file.parts[:1] == ("laic_kernels",) and file.name.startswith("_C."):
            path = os.path.abspath(str(file.locate()))
            if os.path.isfile(path) and os.path.dirname(path) != here:
                return path
    return None


def extension_has_cuda() -> bool:
    if extension_import_error():
        return False
    from laic_kernels import extension
    return extension.with_cuda()


def extension_cuda_why_not(device: torch.device) -> Optional[str]:
    """Why laic_kernels._C's CUDA kernels cannot run on the CUDA ``device``: built without them, or for other GPU
    architectures than this one's (then every launch would fail with "no kernel image is available"); None where
    they can. Asked of the CUDA runtime (once per GPU where its answer lasts: :func:`_cuda_kernels_error`)."""
    if not extension_has_cuda():
        return ("laic_kernels._C was built without CUDA (no toolkit or no visible GPU at build time, or "
                "LAIC_BUILD_CUDA=0); rebuild with LAIC_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    index = device.index if device.index is not None else torch.cuda.current_device()
    error = _cuda_kernels_error(index)
    if not error:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    gpu = f"GPU {index} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor})"
    if not _built_for_other_gpus(error):   # the device's own trouble (a lost context): no rebuild helps
        return f"laic_kernels._C's CUDA kernels cannot run on {gpu} now: {error}"
    return (f"laic_kernels._C's CUDA kernels cannot run on {gpu}: {error}; rebuild them for it: "
            f"TORCH_CUDA_ARCH_LIST={major}.{minor} LAIC_BUILD_CUDA=1 pip install --no-build-isolation -e .")


# What the CUDA runtime says of kernels built for other GPUs (cudaErrorNoKernelImageForDevice,
# cudaErrorInvalidDeviceFunction, cudaErrorUnsupportedPtxVersion): a lasting answer, kept per GPU.
_OTHER_GPUS_SAID = ("no kernel image is available", "invalid device function", "unsupported toolchain",
                    "unsupported ptx")
_CUDA_KERNELS_ERRORS: dict = {}


def _built_for_other_gpus(error: str) -> bool:
    return any(said in error.lower() for said in _OTHER_GPUS_SAID)


def _cuda_kernels_error(index: int) -> str:
    """The CUDA runtime's reason the extension's kernels cannot run on GPU ``index``, "" where they can (an
    extension built before this probe existed is taken to run). Asked once per GPU where the answer lasts (they run,
    or were built for other GPUs); another error (the device's, for now) is asked again next time."""
    if index in _CUDA_KERNELS_ERRORS:
        return _CUDA_KERNELS_ERRORS[index]
    from laic_kernels import _C
    probe = getattr(_C, "cuda_kernels_error", None)
    error = probe(index) if probe is not None else ""
    if not error or _built_for_other_gpus(error):
        _CUDA_KERNELS_ERRORS[index] = error
    return error


def hand_written_backward_why_not(device_type: str) -> Optional[str]:
    """Why an op whose backward is written by hand (an autograd Function) cannot run here: autocast would hand its
    backward the forward's autocast dtypes, and torch.func transforms have no rule for it."""
    if torch.is_autocast_enabled(device_type):
        return (f"autocast is on for {device_type} (the hand-written backward would see the forward's autocast "
                "dtypes)")
    if torch._C._are_functorch_transforms_active():
        return "inside a torch.func transform (the hand-written backward has no functorch rule)"
    return None


def no_backward_why_not(*args, **kwargs) -> Optional[str]:
    """Why a kernel without a backward cannot take these arguments: one of them requires grad (with grad enabled),
    and its output would silently drop that gradient; the reference, plain PyTorch, differentiates it."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "an input requires grad and this kernel has no backward (the reference differentiates it)"
    return None


def triton_backend(op: str, differentiable: bool = False, outputs_differentiable: bool = True) -> Backend:
    """The ``triton`` backend of ``op``, whose kernel module ``laic_kernels/triton/<op>.py`` provides
    ``why_not(*args, **kwargs)`` (size and dtype limits) and the launcher ``<op>(*args, **kwargs)``. The module is
    imported only when the backend is considered, so that importing laic_kernels never imports triton.
    ``differentiable``: the launcher has its own backward; without one, inputs that require grad go elsewhere
    (:func:`no_backward_why_not`), unless ``outputs_differentiable`` is False: no output of the op carries a
    gradient (indices, masks), so there is no backward to lose."""

    def kernel_module():
        import importlib

        return importlib.import_module(f"laic_kernels.triton.{op}")

    def why_not(*args, forced, **kwargs) -> Optional[str]:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        needs_no_backward = differentiable or not outputs_differentiable
        return (triton_why_not(device, forced) or (None if needs_no_backward else no_backward_why_not(*args, **kwargs))
                or kernel_module().why_not(*args, **kwargs))

    def run(*args, **kwargs):
        return getattr(kernel_module(), op)(*args, **kwargs)

    return Backend("triton", why_not, run)


def on_device(device: torch.device):
    """The context a kernel launch needs on ``device``: Triton launches on torch's current CUDA device, not on the
    tensors' (``LAIC(device="cuda:1")`` in one process would hand cuda:0 kernels cuda:1 pointers), so make the
    tensors' device current, as the extension's ``CUDAGuard`` does (``csrc/cuda``). Nothing elsewhere. Entered in
    each Triton custom op's body (``laic_kernels/triton``): the path that eager calls, backward (on autograd's
    threads) and torch.compile all take."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
