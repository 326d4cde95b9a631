"""sinkhorn: the reference against a direct computation and POT; the compiled op (C++ on the CPU, both CUDA launches on
a GPU) against the reference on every device present; no host reads inside checks.values_checked(); bad input."""
import contextlib
import importlib
import math

import numpy as np
import pytest
import torch

import laic_kernels
from laic_kernels import backends, checks, reference
from laic_kernels.backends import explain, extension_has_cuda, extension_import_error
from laic_kernels.sinkhorn import MAX_TOTAL_MASS, cuda_row_blocks

sinkhorn_module = importlib.import_module("laic_kernels.sinkhorn")   # the package's `sinkhorn` is the op

needs_extension = pytest.mark.skipif(extension_import_error() is not None,
                                     reason=f"extension not built: {extension_import_error()}")


@pytest.fixture
def ext_device(device):
    """The ``device`` fixture, for tests of the compiled op: skipped where the extension cannot run on it."""
    if extension_import_error():
        pytest.skip(f"extension not built: {extension_import_error()}")
    if device.type == "cuda" and not extension_has_cuda():
        pytest.skip("laic_kernels._C was built without CUDA")
    return device


def _uniform(batch, b, k, device="cpu"):
    rows = torch.full(batch + (b,), 1.0 / b, device=device)
    cols = torch.full(batch + (k,), 1.0 / k, device=device)
    return rows, cols


def _op(scores, rows, cols, eps, n_iters, tol=None, row_blocks=1):
    """torch.ops.laic.sinkhorn on [G, B, K] problems with the CUDA launch forced by ``row_blocks`` (1: one block per
    problem; more: rows split over blocks; the CPU kernel ignores it). Before the call a NaN block the size of the plan
    is freed, so that on CUDA the caching allocator hands it to the op's output: an entry the kernel fails to write
    stays NaN and fails the comparison."""
    import laic_kernels.extension  # noqa: F401  (registers torch.ops.laic)

    poison = torch.full(scores.shape, math.nan, device=scores.device)
    del poison
    return torch.ops.laic.sinkhorn(scores, rows, cols, eps, n_iters, -1.0 if tol is None else tol, row_blocks)


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
def test_converged_plan_matches_pot(seed, device):
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
        if backend == "extension" and (extension_import_error() or (device.type == "cuda" and not extension_has_cuda())):
            continue
        with laic_kernels.use_backend(backend):
            plan = laic_kernels.sinkhorn(torch.tensor(scores, dtype=torch.float32, device=device), eps=eps,
                                         n_iters=5000, row_marginals=torch.tensor(r, device=device),
                                         col_marginals=torch.tensor(c, device=device), tol=1e-7)
        np.testing.assert_allclose(plan.cpu().numpy(), expected, rtol=2e-3, atol=1e-6, err_msg=backend)


@pytest.mark.parametrize("shape", [(5, 3), (1, 1, 2), (3, 37, 11), (2, 4, 129, 10), (1, 300, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extension_matches_reference(shape, dtype, ext_device):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    scores = (torch.rand(shape, generator=gen) * 2 - 1).to(dtype=dtype, device=ext_device)
    for eps, n_iters in [(0.05, 3), (0.5, 10)]:
        with laic_kernels.use_backend("reference"):
            expected = laic_kernels.sinkhorn(scores, eps=eps, n_iters=n_iters)
        with laic_kernels.use_backend("extension"):
            plan = laic_kernels.sinkhorn(scores, eps=eps, n_iters=n_iters)
        assert plan.dtype == torch.float32 and plan.shape == scores.shape and plan.device == scores.device
        torch.testing.assert_close(plan, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# Row splits: 1 (one block per problem), a few (a ragged last block: 129 rows over 2 blocks of 65, or 7 of 19), and
# more blocks than rows (one row per block).
@pytest.mark.parametrize("row_blocks", [1, 2, 7, 1000])
@pytest.mark.parametrize("g,b,k", [(1, 129, 10), (2, 300, 33), (1, 1, 5), (3, 64, 1), (1, 500, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_matches_reference(g, b, k, row_blocks, dtype, ext_device):
    gen = torch.Generator().manual_seed(g * 10_000 + b * 10 + k)
    scores = (torch.rand(g, b, k, generator=gen) * 2 - 1).to(dtype=dtype, device=ext_device)
    rows = (torch.rand(g, b, generator=gen) + 0.1).to(ext_device)
    cols = torch.rand(g, k, generator=gen) + 0.1
    cols[0, 0] = 0.0 if k > 1 else cols[0, 0]               # an empty column
    cols = (cols / cols.sum(-1, keepdim=True)).to(ext_device) * rows.sum(-1, keepdim=True)
    for eps, n_iters in [(0.05, 3), (0.3, 25)]:
        expected = reference.sinkhorn(scores, eps, n_iters, rows, cols)
        plan = _op(scores, rows, cols, eps, n_iters, row_blocks=row_blocks)
        torch.testing.assert_close(plan, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        if k > 1:
            assert plan[0, :, 0].abs().max() == 0


@pytest.mark.parametrize("row_blocks", [1, 3])
def test_zero_marginals_pad_a_problem_without_changing_its_plan(row_blocks, ext_device):
    # The way to batch problems of other sizes. Zero-marginal rows shifted the other rows' plan by 25% after one
    # iteration (2% after three): their potentials started at zero like the others', and the column step, which comes
    # first, counted them (a fuzzing helper's find, 12-07). Each problem is compared with the textbook iteration on
    # its rows and columns alone.
    gen = torch.Generator().manual_seed(row_blocks)
    g, b, k = 2, 9, 6
    scores = torch.rand(g, b, k, generator=gen) * 2 - 1
    rows, cols = torch.rand(g, b, generator=gen) + 0.1, torch.rand(g, k, generator=gen) + 0.1
    real_rows = [torch.randperm(b, generator=gen)[:n].sort().values for n in (5, 7)]
    real_cols = [torch.randperm(k, generator=gen)[:n].sort().values for n in (4, 3)]
    for i in range(g):
        rows[i][~torch.isin(torch.arange(b), real_rows[i])] = 0
        cols[i][~torch.isin(torch.arange(k), real_cols[i])] = 0
    cols = cols / cols.sum(-1, keepdim=True) * rows.sum(-1, keepdim=True)
    eps = 0.3
    for n_iters in (1, 3):
        plans = {"reference": reference.sinkhorn(scores.to(ext_device), eps, n_iters,
                                                 rows.to(ext_device), cols.to(ext_device)),
                 "extension": _op(scores.to(ext_device), rows.to(ext_device), cols.to(ext_device), eps, n_iters,
                                  row_blocks=row_blocks)}
        for name, plan in plans.items():
            plan = plan.cpu()
            for i in range(g):
                r, c = real_rows[i], real_cols[i]
                alone = _direct_sinkhorn(scores[i][r][:, c].numpy(), eps, n_iters, rows[i][r].numpy(),
                                         cols[i][c].numpy())
                np.testing.assert_allclose(plan[i][r][:, c].numpy(), alone, rtol=2e-5, atol=1e-7,
                                           err_msg=f"{name}, {n_iters} iterations, problem {i}")
                padding = torch.ones(b, k, dtype=torch.bool)
                padding[r.unsqueeze(1), c] = False
                assert plan[i][padding].abs().max() == 0, (name, n_iters, i)


@pytest.mark.parametrize("row_blocks", [1, 3])
def test_tol_stops_early_per_problem(row_blocks, ext_device):
    gen = torch.Generator().manual_seed(11)
    # Problem 0 is nearly balanced already (converges at once); problem 1 is far from it.
    scores = torch.stack([torch.rand(200, 8, generator=gen) * 0.01,
                          torch.rand(200, 8, generator=gen) * 2 - 1]).to(ext_device)
    rows, cols = _uniform((2,), 200, 8, ext_device)
    tol = 1e-4
    plan = _op(scores, rows, cols, 0.05, 1000, tol=tol, row_blocks=row_blocks)
    expected = reference.sinkhorn(scores, 0.05, 1000, rows, cols, tol)
    one_step = reference.sinkhorn(scores[:1], 0.05, 1, rows[:1], cols[:1])
    assert (plan.sum(-2) - 1.0 / 8).abs().max() <= tol
    torch.testing.assert_close(plan[:1], one_step, rtol=1e-5, atol=0)  # problem 0 stopped after one iteration
    # Problem 1 may stop one iteration apart from the reference if a column error lands within rounding of tol.
    torch.testing.assert_close(plan, expected, rtol=2e-3, atol=1e-6)
    # The reference freezes problem 0 as well (it no longer breaks out of its loop, which would need a host read).
    torch.testing.assert_close(expected[:1], one_step, rtol=1e-6, atol=0)


def _one_column_lags(shift: int):
    """A problem (K = 6, tol 1e-5) whose column 5 is the last to reach its marginal: when every other column is
    within tol it is still 2.8 tol off (found by a search over seeds with the reference). Rolled by ``shift``."""
    gen = torch.Generator().manual_seed(27)
    scale = torch.rand(6, generator=gen) * 3
    scores = (torch.rand(1, 200, 6, generator=gen) * 2 - 1) * scale
    cols = torch.rand(1, 6, generator=gen) + 0.05
    rows = torch.full((1, 200), 1.0 / 200)
    return scores.roll(shift, -1), rows, (cols / cols.sum()).roll(shift, -1)


@pytest.mark.parametrize("row_blocks", [1, 3])
def test_tol_waits_for_every_column(row_blocks, ext_device):
    # The stopping rule must read every column: a check that skipped one (the last, or any) stopped with that
    # column several tol off its marginal while the uniform problems above still passed.
    tol = 1e-5
    for shift in range(6):
        scores, rows, cols = (x.to(ext_device) for x in _one_column_lags(shift))
        for name, plan in [("extension", _op(scores, rows, cols, 0.05, 1000, tol=tol, row_blocks=row_blocks)),
                           ("reference", reference.sinkhorn(scores, 0.05, 1000, rows, cols, tol))]:
            errors = (plan.sum(-2) - cols).abs()[0]
            assert errors.max() <= 1.01 * tol, (name, shift, (errors / tol).tolist())


def test_small_eps_is_finite(device):
    scores = (torch.rand(4, 200, 50, generator=torch.Generator().manual_seed(3)) * 2 - 1).to(device)
    rows, cols = _uniform((4,), 200, 50, device)
    runs = {"reference": lambda eps: reference.sinkhorn(scores, eps, 50, rows, cols)}
    if not extension_import_error() and (device.type == "cpu" or extension_has_cuda()):
        runs.update({f"extension, {n} row blocks": (lambda eps, n=n: _op(scores, rows, cols, eps, 50, row_blocks=n))
                     for n in (1, 3)})
    for eps in [1.0, 0.3, 0.1, 0.03, 0.01]:
        for name, run in runs.items():
            plan = run(eps)
            assert torch.isfinite(plan).all(), name
            torch.testing.assert_close(plan.sum(-1), rows, rtol=1e-4, atol=0)
            assert (plan.sum(-2) - cols).abs().max() < 0.05 / 50


def test_the_largest_total_mass_allowed_matches_reference(ext_device):
    # Entries up to the mass the checks allow: the compiled exp's cap (e^88) is above them.
    scores = torch.tensor([[0.0, 0.0], [0.3, -0.2]], device=ext_device)
    rows = torch.tensor([MAX_TOTAL_MASS * 0.95, MAX_TOTAL_MASS * 0.05], device=ext_device)
    cols = torch.tensor([MAX_TOTAL_MASS * 0.97, MAX_TOTAL_MASS * 0.03], device=ext_device)
    results = {}
    for backend in ("reference", "extension"):
        with laic_kernels.use_backend(backend):
            results[backend] = laic_kernels.sinkhorn(scores, eps=1.0, n_iters=50, row_marginals=rows,
                                                     col_marginals=cols)
    assert results["reference"].max() > 0.9 * MAX_TOTAL_MASS
    torch.testing.assert_close(results["extension"], results["reference"], rtol=1e-5, atol=0)


def test_random_marginals_and_broadcasting_match_reference(ext_device):
    gen = torch.Generator().manual_seed(7)
    scores = (torch.rand(3, 31, 12, generator=gen) * 2 - 1).to(ext_device)
    rows = (torch.rand(31, generator=gen) + 0.1).to(ext_device)    # shared by every problem
    cols = torch.rand(3, 12, generator=gen) + 0.1
    cols[1, 4] = 0.0                                                # a zero marginal gives an empty column
    cols = (cols / cols.sum(-1, keepdim=True)).to(ext_device) * rows.sum()
    results = {}
    for backend in ("reference", "extension"):
        with laic_kernels.use_backend(backend):
            results[backend] = laic_kernels.sinkhorn(scores, eps=0.1, n_iters=20, row_marginals=rows,
                                                     col_marginals=cols)
    torch.testing.assert_close(results["extension"], results["reference"], rtol=1e-5, atol=1e-7)
    assert results["extension"][1, :, 4].abs().max() == 0
    torch.testing.assert_close(results["extension"].sum(-1), rows.expand(3, 31), rtol=1e-5, atol=0)


@pytest.mark.parametrize("mass", [1e-30, 1e-36, 1e-38])
def test_a_plan_of_tiny_mass_keeps_its_subnormal_entries(ext_device, mass):
    """Marginals of total mass 1e-38 are valid; the CPU kernel's exp flushed entries below e^-87 to zero (an all-zero
    plan at 1e-38, 13% of the mass lost at 1e-36). The reference keeps them, as float32's subnormals."""
    scores = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)).to(ext_device)
    marginals = torch.full((10,), mass / 10, device=ext_device)
    plans = {}
    for backend in ("reference", "extension"):
        with laic_kernels.use_backend(backend):
            plans[backend] = laic_kernels.sinkhorn(scores, 0.05, 10, row_marginals=marginals, col_marginals=marginals)
    # Subnormals hold fewer digits: compare at a few of float32's smallest steps.
    torch.testing.assert_close(plans["extension"], plans["reference"], rtol=1e-4, atol=4 * 2.0 ** -149)
    assert abs(float(plans["extension"].double().sum()) - mass) <= 1e-3 * mass


def test_a_plan_of_ordinary_mass_holds_no_subnormals_on_the_cpu():
    """Subnormal entries are under 2^-25.5 of a row of mass 2^-100 or more, and every CPU op that reads them takes
    the slow path: the CPU kernel writes them as 0 there (the reference keeps them), within e^-87 of the reference."""
    g = torch.Generator().manual_seed(1)
    scores = 10 * torch.rand(2, 64, 37, generator=g)      # s / eps spans 200: most entries far below e^-87
    plans = {}
    for backend in ("reference", "extension"):
        with laic_kernels.use_backend(backend):
            plans[backend] = laic_kernels.sinkhorn(scores, 0.05, 10)
    tiny = torch.finfo(torch.float32).tiny

    def subnormals(plan):
        return int(((plan > 0) & (plan < tiny)).sum())

    assert subnormals(plans["reference"]) > 100, "the case must have subnormal entries to mean anything"
    assert subnormals(plans["extension"]) == 0
    torch.testing.assert_close(plans["extension"], plans["reference"], rtol=1e-4, atol=2.0 ** -125)


def test_cuda_row_blocks_rule():
    # One large problem (the pipeline's case) on a 132-SM GPU: split, at least 64 rows per block.
    blocks, why = cuda_row_blocks(1, 8192, 1000, 132)
    assert 2 <= blocks <= 8192 // 64 and "split" in why
    assert cuda_row_blocks(1, 65536, 1000, 132)[0] >= blocks   # never fewer blocks for more rows
    assert cuda_row_blocks(1, 130, 1000, 132)[0] == 2          # two blocks of 65 rows
    # Enough problems to fill the SMs, too few rows, or too small a problem: one block per problem, with the reason.
    for args, reason in [((132, 8192, 1000, 132), "SMs"), ((1, 127, 1000, 132), "rows"), ((1, 256, 10, 132), "small")]:
        blocks, why = cuda_row_blocks(*args)
        assert blocks == 1 and reason in why, (args, why)


def test_automatic_launch_matches_reference(ext_device):
    """Through the public function, the launch the dispatcher picks (split rows on a GPU for this one large problem)
    against the reference."""
    scores = (torch.rand(1, 1024, 100, generator=torch.Generator().manual_seed(5)) * 2 - 1).to(ext_device)
    if ext_device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(ext_device).multi_processor_count
        assert cuda_row_blocks(1, 1024, 100, sm_count)[0] > 1
    with laic_kernels.use_backend("extension"):
        plan = laic_kernels.sinkhorn(scores, eps=0.1, n_iters=5)
    expected = reference.sinkhorn(scores, 0.1, 5, *_uniform((1,), 1024, 100, ext_device))
    torch.testing.assert_close(plan, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@pytest.mark.parametrize("backend", ["reference", "extension"])
@pytest.mark.parametrize("tol", [None, 1e-4])
def test_no_host_reads_inside_values_checked(backend, tol, device, monkeypatch):
    if backend == "extension" and (extension_import_error() or (device.type == "cuda" and not extension_has_cuda())):
        pytest.skip("extension not available on this device")
    scores = (torch.rand(2, 300, 20, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(device)
    shares = torch.full((20,), 1 / 20, device=device)

    def call():
        with laic_kernels.use_backend(backend):
            return laic_kernels.sinkhorn(scores, 0.1, 5, col_marginals=shares, tol=tol)

    expected = call()  # also does the one-time set-up (extension import, device properties) before the trap

    def refuse(self, *args, **kwargs):
        raise AssertionError("sinkhorn read a tensor back to the host")

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with pytest.raises(AssertionError, match="read a tensor"):
        call()  # outside values_checked() the value checks do read: the trap works
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with checks.values_checked():
            plan = call()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    torch.testing.assert_close(plan, expected, rtol=0, atol=0)


def test_opcheck(ext_device):
    import laic_kernels.extension  # noqa: F401

    scores = (torch.rand(2, 9, 5) * 2 - 1).to(ext_device)
    rows, cols = _uniform((2,), 9, 5, ext_device)
    op = torch.ops.laic.sinkhorn.default
    torch.library.opcheck(op, (scores, rows, cols, 0.1, 3, -1.0))          # row_blocks left at its default
    for row_blocks in (1, 4):
        torch.library.opcheck(op, (scores, rows, cols, 0.1, 3, 1e-3, row_blocks))


def test_raw_op_refuses_a_backward_and_its_fake_checks_shapes(ext_device):
    """torch.ops.laic.sinkhorn has no derivative: a backward through it raises, naming the public op (before: torch's
    warning, and the scores' .grad left None). Its fake kernel refuses the shapes the real one does, so that
    torch.compile's tracing fails where a run would (before: a [2, 9, 5] plan from [2, 3] and [7] marginals)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    scores = torch.rand(2, 9, 5, device=ext_device, requires_grad=True)
    rows, cols = _uniform((2,), 9, 5, ext_device)
    plan = _op(scores, rows, cols, 0.1, 3)
    with pytest.raises(RuntimeError, match="laic::sinkhorn has no gradient; laic_kernels.sinkhorn"):
        plan.sum().backward()
    with FakeTensorMode(), pytest.raises(RuntimeError, match=r"row_marginals must be \[2, 9\], got \(2, 3\)"):
        torch.ops.laic.sinkhorn(torch.empty(2, 9, 5), torch.empty(2, 3), torch.empty(7), 0.1, 3, -1.0, 1)
    with FakeTensorMode(), pytest.raises(RuntimeError, match=r"col_marginals must be \[2, 5\]"):
        torch.ops.laic.sinkhorn(torch.empty(2, 9, 5), torch.empty(2, 9), torch.empty(2, 4), 0.1, 3, -1.0, 1)


def test_op_rejects_bad_row_blocks(ext_device):
    scores = torch.rand(1, 9, 5, device=ext_device)
    rows, cols = _uniform((1,), 9, 5, ext_device)
    with pytest.raises(RuntimeError, match="row_blocks"):
        _op(scores, rows, cols, 0.1, 3, row_blocks=0)


def test_columns_of_many_rows_meet_a_tight_tol(ext_device):
    """The CPU kernel summed each column over all B rows in float32: at B = 100,000 its columns stayed 3e-6 off
    their marginals (the reference's: 2e-7), so tol = 1e-6 was never met and every iteration ran. The CUDA kernel's
    sums are merged in a tree (warps, then blocks)."""
    scores = (torch.rand(1, 100_000, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(ext_device)
    rows, cols = _uniform((1,), 100_000, 4, ext_device)
    plan = _op(scores, rows, cols, 1.0, 50, tol=1e-6)
    assert float((plan.double().sum(1) - 0.25).abs().max()) <= 1e-6


@needs_extension
def test_the_cpu_kernel_stops_at_the_first_iteration_its_columns_meet_tol():
    """The CPU kernel's convergence check summed the columns in float32: at B = 1,000,000 its sums were further off
    than tol = 1e-6 at every iteration, and a problem converged after 3 iterations ran all n_iters (the plan itself
    was right: only the early stop was lost). The iteration where the plan's columns (summed here in float64) first
    meet tol is found from plans of a fixed number of iterations; the call with tol must give that plan, bit for
    bit."""
    b, tol = 1_000_000, 1e-6
    scores = torch.rand(1, b, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows, cols = _uniform((1,), b, 4)
    for n in range(1, 11):
        plan = _op(scores, rows, cols, 1.0, n)
        if float((plan.double().sum(1) - 0.25).abs().max()) <= tol:
            break
    assert n < 10        # converged well inside the cap below
    assert torch.equal(_op(scores, rows, cols, 1.0, 300, tol=tol), plan)


@needs_extension
@pytest.mark.parametrize("g,b,k", [(2, 256, 100), (2, 3000, 300), (3, 40, 7)])
def test_cpu_problems_solved_together_are_each_solved_alone(g, b, k):
    """Several problems run one per thread, or one after the other each on all threads (where one problem's steps
    split over more threads than there are problems): either way each plan is the one of that problem alone."""
    generator = torch.Generator().manual_seed(g * b + k)
    scores = torch.rand(g, b, k, generator=generator)
    rows, cols = _uniform((g,), b, k)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        together = _op(scores, rows, cols, 0.1, 5, tol=1e-9)
        alone = torch.cat([_op(scores[i:i + 1], rows[i:i + 1], cols[i:i + 1], 0.1, 5, tol=1e-9) for i in range(g)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(together, alone)


@pytest.mark.skipif(not extension_has_cuda(), reason="laic_kernels._C was built without CUDA")
def test_cuda_probe_answers_for_every_gpu_and_none():
    """The extension's own probe (a real CUDA runtime call, csrc/cuda/sinkhorn_cuda.cu): "" for each GPU present
    (the kernels were built for it), a reason without a GPU or for a device that is not there, never a crash."""
    from laic_kernels import _C

    count = torch.cuda.device_count()
    for index in range(count):
        assert _C.cuda_kernels_error(index) == ""
        assert backends.extension_cuda_why_not(torch.device("cuda", index)) is None
    for missing in (count, -1):
        error = _C.cuda_kernels_error(missing)
        assert isinstance(error, str) and error != ""
    # Asking leaves no CUDA error behind for the next launch to report.
    if count:
        torch.ones(3, device="cuda").sum().item()


def test_the_cuda_probe_is_asked_again_unless_its_answer_lasts(monkeypatch):
    """Kernels that run, or were built for other GPUs, are so for good: asked once per GPU. Another error (a lost
    context) may pass: asked again, not kept for the process's life."""
    from laic_kernels import _C

    answers = iter(["an illegal memory access was encountered", "", "never asked"])
    asked = []
    monkeypatch.setattr(_C, "cuda_kernels_error", lambda index: asked.append(index) or next(answers), raising=False)
    monkeypatch.setattr(backends, "_CUDA_KERNELS_ERRORS", {})
    assert backends._cuda_kernels_error(0) == "an illegal memory access was encountered"
    assert backends._cuda_kernels_error(0) == "" and backends._cuda_kernels_error(0) == ""
    assert asked == [0, 0]


# What cudaGetErrorString says of kernels built for other GPUs (cudaErrorNoKernelImageForDevice,
# cudaErrorInvalidDeviceFunction, cudaErrorUnsupportedPtxVersion): only the first was checked.
@pytest.mark.parametrize("runtime_says", ["no kernel image is available for execution on the device",
                                          "invalid device function",
                                          "the provided PTX was compiled with an unsupported toolchain."])
def test_kernels_built_for_other_gpus_are_refused_with_the_rebuild(monkeypatch, runtime_says):
    """A GPU the build left out: the extension backend says so, naming the GPU, its compute capability and the
    rebuild (the reference then runs), instead of every launch failing with "no kernel image is available"."""
    monkeypatch.setattr(backends, "extension_has_cuda", lambda: True)
    monkeypatch.setattr(backends, "_cuda_kernels_error", lambda index: runtime_says if index == 1 else "")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    why = backends.extension_cuda_why_not(torch.device("cuda", 1))
    assert runtime_says in why and "GPU 1 (Tesla T4, compute capability 7.5)" in why
    assert "TORCH_CUDA_ARCH_LIST=7.5" in why
    assert backends.extension_cuda_why_not(torch.device("cuda", 0)) is None
    # The device's own trouble: said, with no rebuild to advise.
    monkeypatch.setattr(backends, "_cuda_kernels_error", lambda index: "an illegal memory access was encountered")
    why = backends.extension_cuda_why_not(torch.device("cuda", 0))
    assert "illegal memory access" in why and "rebuild" not in why
    monkeypatch.setattr(backends, "extension_has_cuda", lambda: False)
    assert "built without CUDA" in backends.extension_cuda_why_not(torch.device("cuda", 0))


def test_a_cuda_device_without_an_index_is_probed_as_the_current_gpu(monkeypatch):
    """torch.device("cuda") is the current GPU (torch.cuda.current_device()), not GPU 0; "cuda:0" is GPU 0 whatever
    the current one. Faked: no GPU needed."""
    runtime_says = "no kernel image is available for execution on the device"
    monkeypatch.setattr(backends, "extension_has_cuda", lambda: True)
    monkeypatch.setattr(backends, "_cuda_kernels_error", lambda index: runtime_says)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5) if index == 1 else (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU model {index}")
    assert "GPU 1 (GPU model 1, compute capability 7.5)" in backends.extension_cuda_why_not(torch.device("cuda"))
    assert "GPU 0 (GPU model 0, compute capability 8.0)" in backends.extension_cuda_why_not(torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_on_a_gpu_the_kernels_were_not_built_for_run_on_the_reference(monkeypatch):
    """The extension backend asks the CUDA probe before taking CUDA scores: without it, a GPU the build left out
    was given the extension, whose every launch failed with "no kernel image is available". (The probe's answer
    faked.)"""
    runtime_says = "no kernel image is available for execution on the device"
    monkeypatch.setattr(backends, "_cuda_kernels_error", lambda index: runtime_says)
    scores = torch.rand(6, 3, generator=torch.Generator().manual_seed(0)).cuda()
    rows, cols = _uniform((), 6, 3, "cuda")
    reasons = explain("sinkhorn", scores, 0.1, 5, row_marginals=rows, col_marginals=cols)
    assert reasons["extension"] is not None and (runtime_says in reasons["extension"]
                                                 or "built without CUDA" in reasons["extension"]), reasons
    plan = laic_kernels.sinkhorn(scores, 0.1, 5, row_marginals=rows, col_marginals=cols)
    torch.testing.assert_close(plan, reference.sinkhorn(scores, 0.1, 5, rows, cols), rtol=1e-5, atol=1e-7)


@needs_extension
def test_dispatch_picks_extension_and_explains():
    scores = torch.rand(4, 3)
    rows, cols = _uniform((), 4, 3)
    reasons = laic_kernels.backends.explain("sinkhorn", scores, 0.1, 3, row_marginals=rows, col_marginals=cols)
    assert reasons == {"extension": None, "reference": None}
    # float64 scores too, in float32 as the reference takes them (they went to the reference, for no precision).
    reasons = laic_kernels.backends.explain("sinkhorn", scores.double(), 0.1, 3, row_marginals=rows, col_marginals=cols)
    assert reasons == {"extension": None, "reference": None}
    scores = torch.randn(3, 40, 7, dtype=torch.float64)
    with laic_kernels.use_backend("extension"):
        plan = laic_kernels.sinkhorn(scores, 0.05, 10)
        assert torch.equal(plan, laic_kernels.sinkhorn(scores.float(), 0.05, 10)) and plan.dtype == torch.float32
    torch.testing.assert_close(plan, reference.sinkhorn(scores, 0.05, 10, *_uniform((3,), 40, 7)), rtol=1e-4,
                               atol=1e-7)
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
    (dict(scores=torch.rand(3, 2), n_iters=torch.tensor(3)), "n_iters"),   # a tensor is refused, never read
    (dict(scores=torch.rand(3, 2), tol=-1.0), "tol"),
    (dict(scores=torch.rand(3, 2), tol=torch.tensor(1e-3)), "tol"),
    (dict(scores=torch.rand(3, 2), row_marginals=torch.tensor([0.5, 0.7, -0.2])), "row_marginals"),
    (dict(scores=torch.rand(3, 2), row_marginals=torch.ones(4)), "row_marginals"),
    (dict(scores=torch.rand(3, 2), col_marginals=torch.tensor([0.5, 0.6])), "same sum"),
    (dict(scores=torch.rand(3, 2), col_marginals=torch.tensor([0.5, math.inf])), "col_marginals"),
    (dict(scores=torch.rand(3, 2, dtype=torch.float64).to(torch.int64)), "scores"),
    # One-hot rows summing to 1 each (a plan of mass 6 for 1/6 a row) came out before.
    (dict(scores=torch.tensor([[0.0, 1.0], [0.5, 0.2], [1.0, 0.0]]), eps=1e-30), "eps = 1e-30 is below 1/1e"),
    (dict(scores=torch.tensor([[0.0, 1e6 + 1.0], [0.0, 0.0]]), eps=1.0), "eps = 1 is below"),
    # A constant offset of 2e6 eps (the same plan, mathematically) moved entries by 33%, unrefused.
    (dict(scores=torch.rand(64, 10) + 1e5, eps=0.05), "eps = 0.05 is below 1/1e.* largest magnitude"),
    # A plan entry of 2.4e38 came out as 1.65e38 (e^88) from the compiled kernels.
    (dict(scores=torch.zeros(1, 2), row_marginals=torch.tensor([2.5e38]), col_marginals=torch.tensor([2.4e38, 1e37])),
     "row_marginals sums to more than 1e\\+38"),
    # 1/eps overflowed float32: an all-NaN plan on every backend.
    (dict(scores=torch.full((4, 3), 0.5), eps=1e-300), "eps = 1e-300 is too small: 1/eps must be a finite float32"),
    # An empty batch dimension: it said "scores has rows but no columns ... (an embedding)".
    (dict(scores=torch.rand(2, 0, 7, 5)), r"scores is empty \(shape \(2, 0, 7, 5\): dimension 1 has size 0\)"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        laic_kernels.sinkhorn(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scores=torch.rand(0, 3)), "scores"),
    (dict(scores=torch.rand(3, 2), eps=0.0), "eps"),
    (dict(scores=torch.rand(3, 2), n_iters=torch.tensor(3)), "n_iters"),
    (dict(scores=torch.rand(3, 2), row_marginals=torch.ones(4)), "row_marginals"),
])
def test_values_checked_still_checks_arguments(kwargs, match):
    with checks.values_checked(), pytest.raises(ValueError, match=match):
        laic_kernels.sinkhorn(**kwargs)


def test_scores_whose_sum_overflows_pass_the_value_check():
    """The scores' check reads their sum first (laic_kernels.checks.sum_is_finite): finite scores near float32's
    largest value, whose sum overflows, pass; an infinite or NaN score among them still fails, by name."""
    rows, cols = torch.full((1, 64), 1 / 64), torch.full((1, 3), 1 / 3)
    big = torch.full((1, 64, 3), torch.finfo(torch.float32).max / 2)
    eps = 1e33     # scores of 1.7e38 are held to float32's precision at eps >= 1.7e32 (MAX_RANGE_OVER_EPS)
    sinkhorn_module._check_values(big, eps, rows, cols)
    for bad in (math.inf, math.nan):
        spoiled = big.clone()
        spoiled[0, 5, 1] = bad
        with pytest.raises(ValueError, match="scores contains NaN"):
            sinkhorn_module._check_values(spoiled, eps, rows, cols)


@pytest.mark.parametrize("eps", [1e34, 1e40, 1.0])
def test_float64_scores_beyond_float32_are_refused_by_name(eps):
    """Every backend holds scores / eps in float32: float64 scores of 1e39 became inf there, and at eps = 1e34 an
    all-NaN plan came out without an error (the range check's bound, 1e6 eps, was inf in float32 too: inf <= inf).
    At eps = 1 the refusal blamed eps, whose ratio to the scores is fine at 1e34."""
    scores = torch.tensor([[1e39, 0.0], [0.0, 1e39]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"scores reach beyond 3\.4e\+38 in magnitude.*scale the scores and eps down"):
        laic_kernels.sinkhorn(scores, eps, 3)


@pytest.mark.parametrize("eps", [1e37, 1e40])
def test_float64_scores_scaled_down_as_advised_match_direct_computation(eps):
    # The fix the refusal above gives: scores and eps scaled down together, the same scores / eps. (At eps = 1e34 the
    # range of 1e5 eps costs the documented 2e-3 of float32 precision.)
    scores = np.array([[1e39, 0.0], [0.0, 1e39]])
    scale = 1e-10
    plan = laic_kernels.sinkhorn(torch.tensor(scores * scale), eps * scale, 3)
    half = np.full(2, 0.5)
    # Less the largest score: a constant leaves the plan unchanged, and exp(1e39 / eps) overflows float64.
    expected = _direct_sinkhorn(scores - scores.max(), eps, 3, half, half)
    np.testing.assert_allclose(plan.numpy(), expected, rtol=1e-5, atol=1e-12)


def test_float32_scores_whose_range_overflows_float32_are_taken():
    # The scores' range, 6e38, is beyond float32 (as was the check's own difference) but within MAX_RANGE_OVER_EPS
    # eps: scores / eps is +-100 and the plan is well defined.
    scores = torch.tensor([[3e38, -3e38], [-3e38, 3e38]])
    plan = laic_kernels.sinkhorn(scores, 3e36, 3)
    half = np.full(2, 0.5)
    expected = _direct_sinkhorn(scores.double().numpy() / 3e36, 1.0, 3, half, half)
    np.testing.assert_allclose(plan.numpy(), expected, rtol=1e-5, atol=1e-12)


def test_column_marginals_whose_float32_sum_overflows_are_refused():
    # Columns of 3e38 each summed to inf in float32, and the equal-sum check passed as inf <= inf: rows of 1e38 got a
    # plan that ignored the columns. The same mismatch scaled down was always refused; now both are, alike.
    scores = torch.zeros(1, 2)
    for scale in (1e38, 1.0):
        for backend in ("reference", None):
            with laic_kernels.use_backend(backend), pytest.raises(ValueError, match="must have the same sum"):
                laic_kernels.sinkhorn(scores, 1.0, 5, row_marginals=torch.tensor([1.0 * scale]),
                                      col_marginals=torch.tensor([3.0 * scale, 3.0 * scale]))
    # Equal sums near the largest allowed mass, in columns whose float32 sum is exact, still pass.
    plan = laic_kernels.sinkhorn(scores, 1.0, 5, row_marginals=torch.tensor([6e37]),
                                 col_marginals=torch.tensor([3e37, 3e37]))
    np.testing.assert_allclose(plan.numpy(), [[3e37, 3e37]], rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_uniform_half_precision_marginals_are_taken(dtype):
    # Uniform marginals of 9 rows and 4 columns rounded to float16 sum 2.4e-4 apart (bfloat16 2e-3): refused as
    # unequal sums, although their dtype is accepted (a QA helper, 12-08). Sums apart by more than the dtype's
    # rounding still are.
    scores = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    rows, cols = torch.full((9,), 1 / 9, dtype=dtype), torch.full((4,), 0.25, dtype=dtype)
    assert abs(float(rows.double().sum()) - 1.0) > 1e-4
    for backend in ("reference", None):
        with laic_kernels.use_backend(backend):
            plan = laic_kernels.sinkhorn(scores, 0.5, 5, row_marginals=rows, col_marginals=cols)
        expected = _direct_sinkhorn(scores.double().numpy(), 0.5, 5, rows.double().numpy(), cols.double().numpy())
        np.testing.assert_allclose(plan.numpy(), expected, rtol=1e-4, atol=1e-9)
        with laic_kernels.use_backend(backend), pytest.raises(ValueError, match="must have the same sum"):
            laic_kernels.sinkhorn(scores, 0.5, 5, row_marginals=rows, col_marginals=cols * 1.05)


def test_values_checked_skips_the_value_checks():
    # A negative marginal is caught outside values_checked() and passed through inside it (the caller's promise).
    bad = torch.tensor([0.5, 0.7, -0.2])
    with pytest.raises(ValueError, match="row_marginals"):
        laic_kernels.sinkhorn(torch.rand(3, 2), row_marginals=bad)
    with laic_kernels.use_backend("reference"), checks.values_checked():
        plan = laic_kernels.sinkhorn(torch.rand(3, 2), row_marginals=bad)
    assert torch.isnan(plan).any()  # the log of a negative marginal


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_with_cpu_marginals_are_refused():
    with pytest.raises(ValueError, match="different devices"):
        laic_kernels.sinkhorn(torch.rand(3, 2, device="cuda"), row_marginals=torch.full((3,), 1 / 3))


def test_a_plan_of_scores_that_require_grad_is_differentiated_not_cut_off():
    # The extension has no backward: such scores go to the reference, which differentiates (the extension used to
    # take them and return a plan without a gradient, with only a warning).
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(5, 4, generator=g)
    grads = []
    for backend in (None, "reference"):
        scores = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with laic_kernels.use_backend(backend) if backend else contextlib.nullcontext():
            (laic_kernels.sinkhorn(scores, 0.5, 4) * weights).sum().backward()
        grads.append(scores.grad)
    assert grads[0] is not None
    torch.testing.assert_close(grads[0], grads[1])
    # Both runs above are the reference: the gradient itself against autograd through the textbook iteration in
    # float64 (plain domain, default marginals 1/B and 1/K).
    scores = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).double().requires_grad_(True)
    p = torch.exp(scores / 0.5)
    for _ in range(4):
        p = p * ((1.0 / 4) / p.sum(0))[None, :]
        p = p * ((1.0 / 5) / p.sum(1))[:, None]
    (p * weights.double()).sum().backward()
    torch.testing.assert_close(grads[0].double(), scores.grad, rtol=1e-4, atol=1e-7)
    reason = explain("sinkhorn", torch.zeros(2, 2, requires_grad=True), 1.0, 3)
    assert extension_import_error() or "requires grad" in reason["extension"]
