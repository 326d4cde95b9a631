"""Loads the compiled ops (``torch.ops.laic.*``) and registers their fake kernels, so that ``torch.compile`` can
trace through them without running them."""
import torch

from laic_kernels import _C  # noqa: F401  (its TORCH_LIBRARY block registers torch.ops.laic)


@torch.library.register_fake("laic::sinkhorn")
def _sinkhorn_fake(scores, row_marginals, col_marginals, eps, n_iters, tol, row_blocks=1):
    return scores.new_empty(scores.shape, dtype=torch.float32)


def with_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return bool(_C.with_cuda())
