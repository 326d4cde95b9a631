"""Triton kernels. Import only through the ops in ``laic_kernels`` (which check inputs and pick the backend)."""
