"""Triton kernels. Import only through the ops in ``laic_kernels`` (which check inputs and pick the backend)."""
import os

# Compile options every launch passes. FP fusion (multiply-adds fused into FMAs) is Triton's default up to 3.9, which
# warns on every process's first compile that 3.10 turns it off: the kernels were tuned and their GPU tolerances
# measured with it on, so it is asked for, not left to the version's default.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _interpreter_scalars_as_indices() -> None:
    """Triton's interpreter before 3.7 turns a scalar into a Python int with int() of a 1-element array, which numpy
    2.4 refuses: every kernel loop with a run-time bound failed (85 tests under triton 3.6, the GPU machine's
    version, and every Triton row of ``TRITON_INTERPRET=1 python benchmarks/throughput.py``). Upstream's fix
    (triton-lang/triton#9171, PR #9172) squeezes the array first; so does this, for the interpreter only (compiled
    kernels never call it), whoever imports the kernels: tests, benchmarks or a user."""
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:          # no triton (a CPU-only torch): nothing runs through it
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_scalars", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_scalars = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_scalars_as_indices()
