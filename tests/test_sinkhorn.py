"""sinkhorn: the reference against a direct computation and POT, the compiled op against the reference, bad input."""
import math

import numpy as np
import pytest
import torch

import laic_kernels
from laic_kernels import reference
from laic_kernels.backends import extension_import_error

needs_extension = pytest.mark.skipif(extension_import_error() is not None,
                                     reason=f"extension not built: {extension_import_error()}")


def _uniform(batch, b, k):
    rows = torch.full(batch + (b,), 1.0 / b)
    cols = torch.full(batch + (k,), 1.0 / k)
    return rows, cols


def _direct_sinkhorn(scores: np.ndarray, eps: float, n_iters: int, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Textbook Sinkhorn-Knopp in float64 and the plain (not log) domain: scale columns, then rows."""
    p = np.exp(scores.astype(np.float64) / eps)
    for _ in range(n_iters):
        p = p * (c / p.sum(0))[None, :]
        p = p * (r / p.sum(1))[:, None]
    return p


@pytest.mark.parametrize("b,k", [(1, 2), (7, 3), (37, 11), (64, 100)])
def test_reference_matches_direct_computation(b, k):
    gen = torch.Generator().manual_seed(b * 100 + k)
    scores = torch.rand(b, k, generator=gen, dtype=torch.float64) * 2 - 1
    rows, cols = _uniform((), b, k)
    plan = reference.sinkhorn(scores, 0.2, 7, rows.double(), cols.double())
    expected = _direct_sinkhorn(scores.numpy(), 0.2, 7, rows.numpy(), cols.numpy())
    np.testing.assert_allclose(plan.numpy(), expected, rtol=1e-5, atol=1e-9)
    # Rows are scaled last: they match their marginals exactly up to float32 rounding.
    np.testing.assert_allclose(plan.sum(-1).numpy(), rows.numpy(), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converged_plan_matches_pot(seed):
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(seed)
    b, k, eps = 23, 9, 0.1
    scores = rng.uniform(-1, 1, size=(b, k))
    r = rng.uniform(0.1, 1.0, size=b)
    c = rng.uniform(0.1, 1.0, size=k)
    r, c = r / r.sum(), c / c.sum() * 1.0
    # POT minimises <P, M> - eps H(P): exp(-M / eps) is our exp(scores / eps) with M = -scores.
    expected = ot.sinkhorn(r, c, -scores, eps, numItermax=100000, stopThr=1e-10)
    for backend in ("reference", "extension"):
        if backend == "extension" and extension_import_error():
            continue
        with laic_kernels.use_backend(backend):
            plan = laic_kernels.sinkhorn(torch.tensor(scores, dtype=torch.float32), eps=eps, n_iters=5000,
                                         row_marginals=torch.tensor(r), col_marginals=torch.tensor(c), tol=1e-7)
        np.testing.assert_allclose(plan.numpy(), expected, rtol=2e-3, atol=1e-6, err_msg=backend)


@needs_extension
@pytest.mark.parametrize("shape", [(5, 3), (1, 1, 2), (3, 37, 11), (2, 4, 129, 10), (1, 300, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extension_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    scores = (torch.rand(shape, generator=gen) * 2 - 1).to(dtype)
    for eps, n_iters in [(0.05, 3), (0.5, 10)]:
        with laic_kernels.use_backend("reference"):
            expected = laic_kernels.sinkhorn(scores, eps=eps, n_iters=n_iters)
        with laic_kernels.use_backend("extension"):
            plan = laic_kernels.sinkhorn(scores, eps=eps, n_iters=n_iters)
        assert plan.dtype == torch.float32 and plan.shape == scores.shape
        torch.testing.assert_close(plan, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@needs_extension
@pytest.mark.parametrize("eps", [1.0, 0.3, 0.1, 0.03, 0.01])
def test_small_eps_is_finite(eps):
    scores = torch.rand(4, 200, 50, generator=torch.Generator().manual_seed(3)) * 2 - 1
    rows, cols = _uniform((4,), 200, 50)
    for backend in ("reference", "extension"):
        with laic_kernels.use_backend(backend):
            plan = laic_kernels.sinkhorn(scores, eps=eps, n_iters=50)
        assert torch.isfinite(plan).all(), backend
        torch.testing.assert_close(plan.sum(-1), rows, rtol=1e-4, atol=0)
        assert (plan.sum(-2) - cols).abs().max() < 0.05 / 50


@needs_extension
def test_random_marginals_and_broadcasting_match_reference():
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(3, 31, 12, generator=gen) * 2 - 1
    rows = torch.rand(31, generator=gen) + 0.1            # shared by every problem
    cols = torch.rand(3, 12, generator=gen) + 0.1
    cols[1, 4] = 0.0                                       # a zero marginal gives an empty column
    cols = cols / cols.sum(-1, keepdim=True) * rows.sum()
    results = {}
    for backend in ("reference", "extension"):
        with laic_kernels.use_backend(backend):
            results[backend] = laic_kernels.sinkhorn(scores, eps=0.1, n_iters=20, row_marginals=rows,
                                                     col_marginals=cols)
    torch.testing.assert_close(results["extension"], results["reference"], rtol=1e-5, atol=1e-7)
    assert results["extension"][1, :, 4].abs().max() == 0
    torch.testing.assert_close(results["extension"].sum(-1), rows.expand(3, 31), rtol=1e-5, atol=0)


@needs_extension
def test_tol_stops_early_per_problem():
    gen = torch.Generator().manual_seed(11)
    # Problem 0 is nearly balanced already (converges at once); problem 1 is far from it.
    scores = torch.stack([torch.rand(40, 8, generator=gen) * 0.01, torch.rand(40, 8, generator=gen) * 2 - 1])
    tol = 1e-4
    for backend in ("reference", "extension"):
        with laic_kernels.use_backend(backend):
            plan = laic_kernels.sinkhorn(scores, eps=0.05, n_iters=1000, tol=tol)
            one_step = laic_kernels.sinkhorn(scores[:1], eps=0.05, n_iters=1)
        assert (plan.sum(-2) - 1.0 / 8).abs().max() <= tol, backend
        torch.testing.assert_close(plan[:1], one_step, rtol=1e-6, atol=0)  # problem 0 stopped after one iteration


@needs_extension
def test_opcheck():
    import laic_kernels.extension  # noqa: F401

    scores = torch.rand(2, 9, 5) * 2 - 1
    rows, cols = _uniform((2,), 9, 5)
    torch.library.opcheck(torch.ops.laic.sinkhorn.default, (scores, rows, cols, 0.1, 3, -1.0))


@needs_extension
def test_dispatch_picks_extension_and_explains():
    scores = torch.rand(4, 3)
    rows, cols = _uniform((), 4, 3)
    reasons = laic_kernels.backends.explain("sinkhorn", scores, 0.1, 3, rows, cols, None)
    assert reasons == {"extension": None, "reference": None}
    reasons = laic_kernels.backends.explain("sinkhorn", scores.double(), 0.1, 3, rows, cols, None)
    assert "float64" in reasons["extension"]
    with laic_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="no 'triton' backend"):
        laic_kernels.sinkhorn(scores)


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("LAIC_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LAIC_KERNELS_BACKEND"):
        laic_kernels.sinkhorn(torch.rand(3, 2))
    monkeypatch.setenv("LAIC_KERNELS_BACKEND", "reference")
    assert laic_kernels.forced_backend() == "reference"
    with laic_kernels.use_backend(None):  # the context manager takes precedence: automatic
        assert laic_kernels.forced_backend() is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(scores=torch.rand(5)), "scores"),
    (dict(scores=torch.rand(0, 3)), "scores"),
    (dict(scores=torch.tensor([[0.0, math.nan]])), "scores"),
    (dict(scores=torch.rand(3, 2), eps=0.0), "eps"),
    (dict(scores=torch.rand(3, 2), eps=-1.0), "eps"),
    (dict(scores=torch.rand(3, 2), n_iters=0), "n_iters"),
    (dict(scores=torch.rand(3, 2), tol=-1.0), "tol"),
    (dict(scores=torch.rand(3, 2), row_marginals=torch.tensor([0.5, 0.7, -0.2])), "row_marginals"),
    (dict(scores=torch.rand(3, 2), row_marginals=torch.ones(4)), "row_marginals"),
    (dict(scores=torch.rand(3, 2), col_marginals=torch.tensor([0.5, 0.6])), "same sum"),
    (dict(scores=torch.rand(3, 2), col_marginals=torch.tensor([0.5, math.inf])), "col_marginals"),
    (dict(scores=torch.rand(3, 2, dtype=torch.float64).to(torch.int64)), "scores"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        laic_kernels.sinkhorn(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mismatched_devices():
    with pytest.raises(ValueError, match="different devices"):
        laic_kernels.sinkhorn(torch.rand(3, 2, device="cuda"), row_marginals=torch.full((3,), 1 / 3))
