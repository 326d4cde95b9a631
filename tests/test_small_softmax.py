"""laic_kernels.small_softmax against torch.softmax / torch.log_softmax over the last dimension: values and gradients,
short and long last dimensions (the transposed form below SMALL_K, the direct one from it on), 2-D and 3-D inputs."""
import pytest
import torch

from laic_kernels import small_softmax

SHAPES = [(1,), (10,), (1, 1), (7, 2), (256, 10), (33, 15), (5, 16), (9, 47), (2, 256, 10), (3, 5, 17)]
OPS = [(small_softmax.softmax, torch.softmax), (small_softmax.log_softmax, torch.log_softmax)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("ops", OPS, ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_along_the_last_dimension(shape, ops, dtype):
    ours, theirs = ops
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 4).requires_grad_(True)
    upstream = torch.randn(shape, generator=gen, dtype=dtype)
    got = ours(x)
    assert got.is_contiguous() and got.shape == x.shape and got.dtype == dtype
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    want = theirs(x, dim=-1)
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grad, want_grad, **tol)


def test_transposes_only_short_rows_on_the_cpu():
    assert small_softmax._transposed(torch.zeros(4, small_softmax.SMALL_K - 1))
    assert not small_softmax._transposed(torch.zeros(4, small_softmax.SMALL_K))
    assert not small_softmax._transposed(torch.zeros(10))   # one row: nothing to transpose


@pytest.mark.parametrize("ops", OPS, ids=["softmax", "log_softmax"])
def test_non_contiguous_input(ops):
    """A transposed view (columns of a wider matrix), short and long rows."""
    ours, theirs = ops
    for k in (10, 40):
        x = torch.randn(k, 64, generator=torch.Generator().manual_seed(k)).t()
        assert not x.is_contiguous()
        torch.testing.assert_close(ours(x), theirs(x, dim=-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_backward_is_autograds(shape, dtype):
    gen = torch.Generator().manual_seed(7 * sum(shape))
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 4).requires_grad_(True)
    upstream = torch.randn(shape, generator=gen, dtype=dtype)
    probs = torch.softmax(x, dim=-1)
    (want,) = torch.autograd.grad(probs, x, upstream)
    got = small_softmax.softmax_backward(probs.detach(), upstream)
    assert got.is_contiguous() and got.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, **tol)
