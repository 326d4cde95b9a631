"""Triton kernels. Import only through the ops in ``laic_kernels`` (which check inputs and pick the backend)."""

# Compile options every launch passes. FP fusion (multiply-adds fused into FMAs) is Triton's default up to 3.9, which
# warns on every process's first compile that 3.10 turns it off: the kernels were tuned and their GPU tolerances
# measured with it on, so it is asked for, not left to the version's default.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
