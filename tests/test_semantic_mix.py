"""semantic_mix: the Triton kernels (interpreter on CPU, compiled on CUDA) against the chunked reference."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

triton = pytest.importorskip(
    "triton", reason="Triton is not installed (a CPU-only torch does not bring it); its kernels' tests need it")

import laic_kernels
from laic_kernels.triton import COMPILE_OPTIONS
from laic_kernels import reference
from laic_kernels.triton import semantic_mix as kernel

from conftest import poisoned_like

FP32_ATOL = 1e-4
# Half inputs: the softmax weights are rounded to the nouns' dtype before the weighted sum (as in flash attention).
HALF_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def triton_mix(images, nouns, tau, topk=None):
    with laic_kernels.use_backend("triton"):
        return laic_kernels.semantic_mix(images, nouns, tau, topk=topk)


def unit_rows(n, d, gen, device, dtype=torch.float32):
    """Random unit rows, like CLIP embeddings (cosine logits in [-1, 1])."""
    return F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device, dtype)


@pytest.mark.parametrize("n, m, d, tau, topk", [
    (37, 1003, 40, 0.005, None),   # odd shapes, the smallest temperature
    (37, 1003, 40, 0.005, 7),
    (5, 100, 512, 0.05, None),     # CLIP ViT-B width
    (5, 100, 768, 0.01, None),     # CLIP ViT-L width (padded to 1024 inside)
    (5, 100, 768, 0.01, 100),      # topk = M
    (1, 1, 16, 0.1, None),         # one image, one noun
    (1, 1, 16, 0.1, 1),
])
def test_matches_reference_fp32(device, n, m, d, tau, topk):
    gen = torch.Generator().manual_seed(n + m + d)
    images, nouns = unit_rows(n, d, gen, device), unit_rows(m, d, gen, device)
    out = triton_mix(images, nouns, tau, topk)
    assert out.shape == (n, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference.semantic_mix(images, nouns, tau, topk=topk), atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(n, device=device), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("topk", [None, 5])
def test_half_precision(device, dtype, topk):
    gen = torch.Generator().manual_seed(2)
    images, nouns = unit_rows(20, 64, gen, device, dtype), unit_rows(90, 64, gen, device, dtype)
    out = triton_mix(images, nouns, 0.05, topk)
    torch.testing.assert_close(out, reference.semantic_mix(images, nouns, 0.05, topk=topk),
                               atol=HALF_ATOL[dtype], rtol=0)


def test_large_logits_stay_finite(device):
    """Unnormalised inputs with a small tau: logits in the thousands, the running maximum keeps exp finite."""
    gen = torch.Generator().manual_seed(4)
    images = (3 * torch.randn(9, 32, generator=gen)).to(device)
    nouns = (3 * torch.randn(150, 32, generator=gen)).to(device)
    out = triton_mix(images, nouns, 0.01)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, reference.semantic_mix(images, nouns, 0.01), atol=FP32_ATOL, rtol=0)


def test_images_far_from_every_noun_mix_their_nearest_nouns(device):
    """Every similarity of a row below -0.5 at tau = 0.005, and M not a multiple of the noun tile: the padded noun
    columns must not count (as logits of 0 they would be the row's maximum, the real weights would underflow and
    the mixture come out zero; a mutation audit removed their mask unnoticed, 12-05)."""
    gen = torch.Generator().manual_seed(8)
    direction = F.normalize(torch.randn(1, 32, generator=gen), dim=1)
    nouns = F.normalize(direction + 0.1 * torch.randn(37, 32, generator=gen), dim=1).to(device)
    images = F.normalize(-direction + 0.1 * torch.randn(6, 32, generator=gen), dim=1).to(device)
    assert float((images @ nouns.t()).max()) < -0.5
    out = triton_mix(images, nouns, 0.005)
    torch.testing.assert_close(out, reference.semantic_mix(images, nouns, 0.005), atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(6, device=device), atol=1e-5, rtol=0)


@pytest.mark.parametrize("topk", [None, 3])
def test_poisoned_output_and_strided_inputs(device, topk):
    gen = torch.Generator().manual_seed(6)
    images = unit_rows(70, 2 * 24, gen, device)[:, ::2]          # strided columns
    nouns = unit_rows(24, 130, gen, device).t()                   # transposed
    assert not images.is_contiguous() and not nouns.is_contiguous()
    out = poisoned_like(torch.empty(70, 24, device=device))
    kernel.semantic_mix_into(images, nouns, 0.02, topk, out)
    torch.testing.assert_close(out, reference.semantic_mix(images, nouns, 0.02, topk=topk), atol=FP32_ATOL, rtol=0)


def test_inputs_the_kernel_leaves_to_the_reference(device):
    wide = torch.randn(2, 1025, device=device)
    assert "1024" in kernel.why_not(wide, wide, 0.1)
    few = torch.randn(2, 8, device=device)
    assert "on-chip top-k limit" in kernel.why_not(few, torch.randn(300, 8, device=device), 0.1, topk=200)
    with pytest.raises(RuntimeError, match="1024"):
        triton_mix(wide, wide, 0.1)


def test_a_topk_above_the_kernels_limit_is_named_topk(device):
    # semantic_mix's argument is topk: the refusal said "k=150", similarity_topk's name for it.
    gen = torch.Generator().manual_seed(0)
    images, nouns = unit_rows(3, 8, gen, device), unit_rows(200, 8, gen, device)
    with pytest.raises(RuntimeError, match=r"cannot take this input: topk=150 is above the kernel's on-chip top-k "
                                           r"limit of 128"):
        triton_mix(images, nouns, 0.1, topk=150)
    # Automatic selection takes the reference instead, which mixes the 150 best nouns (softmax over their logits).
    logits = images.cpu().double() @ nouns.cpu().double().t()
    best = logits.topk(150, dim=1)
    weights = torch.softmax(best.values / 0.1, dim=1)
    expected = F.normalize(torch.einsum("nk,nkd->nd", weights, nouns.cpu().double()[best.indices]), dim=1)
    torch.testing.assert_close(laic_kernels.semantic_mix(images, nouns, 0.1, topk=150).cpu().double(), expected,
                               atol=FP32_ATOL, rtol=0)


def test_custom_op_fake_kernel_and_opcheck():
    op = torch.ops.laic_triton.semantic_mix.default
    with FakeTensorMode():
        out = op(torch.empty(10, 8, dtype=torch.float16), torch.empty(40, 8, dtype=torch.float16), 0.1, 4)
    assert out.shape == (10, 8) and out.dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(5, 16, generator=gen), torch.randn(30, 16, generator=gen), 0.1, None)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0.0), "tau must be a positive"),
    (dict(tau=0.1, topk=0), "topk must be between 1"),
    (dict(tau=0.1, topk=41), "topk must be between 1"),
])
def test_bad_inputs(kwargs, match):
    images, nouns = torch.randn(5, 8), torch.randn(40, 8)
    with pytest.raises(ValueError, match=match):
        triton_mix(images, nouns, **kwargs)
    with pytest.raises(ValueError, match="same feature dimension"):
        triton_mix(images, torch.randn(40, 9), 0.1)


@pytest.mark.parametrize("images_scale, nouns_scale, tau, match", [
    (100.0, 1.0, 1e-36, "dot products over tau = 1e-36 may overflow"),   # NaN rows before
    (1.0, 1.0, 3e-39, "tau = 3e-39 is too small"),                        # log2(e) / tau is inf: NaN rows before
    (1e30, 1e7, 1000.0, "dot products over tau = 1000 may overflow"),     # finite over tau, but not before it
    (1e20, 1e20, 0.05, "dot products over tau = 0.05 may overflow"),     # NaN rows before
    (1.0, 1e30, 0.05, "the norm of their mixture may overflow"),         # zero rows where unit rows were due
])
def test_products_or_mixtures_beyond_float32_are_refused(images_scale, nouns_scale, tau, match):
    gen = torch.Generator().manual_seed(0)
    images, nouns = torch.randn(5, 8, generator=gen), torch.randn(40, 8, generator=gen)
    with pytest.raises(ValueError, match=match):
        laic_kernels.semantic_mix(images * images_scale, nouns * nouns_scale, tau)
    out = laic_kernels.semantic_mix(images, nouns, 1e-30)   # tiny, but within range: the nearest noun's direction
    torch.testing.assert_close(out, torch.nn.functional.normalize(nouns[(images @ nouns.t()).argmax(1)], dim=1))


def test_public_ops_inside_torch_compile():
    """Both ops in a compiled function (aot_eager: the graph is traced with the fake kernels, no C++ compiler)."""
    @torch.compile(backend="aot_eager")
    def text_counterparts_and_scores(images, nouns):
        values, _ = laic_kernels.similarity_topk(images, nouns, 3)
        return laic_kernels.semantic_mix(images, nouns, 0.1, topk=4) + 1, values * 2

    gen = torch.Generator().manual_seed(9)
    images, nouns = unit_rows(5, 16, gen, "cpu"), unit_rows(30, 16, gen, "cpu")
    with laic_kernels.use_backend("triton"):
        mixed, scores = text_counterparts_and_scores(images, nouns)
    torch.testing.assert_close(mixed - 1, reference.semantic_mix(images, nouns, 0.1, topk=4), atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(scores / 2, reference.similarity_topk(images, nouns, 3)[0], atol=1e-5, rtol=0)


# Shared memory one block may take (opt-in): sm_86/89/120 (A10, L4, L40S, RTX cards) 99 KiB, sm_90 227 KiB.
SHARED_LIMIT_KIB = {86: 99, 90: 227}
PLAN_TABLES = [(torch.bfloat16, d_pad) for d_pad in (256, 512, 1024)] + \
    [(torch.float32, d_pad) for d_pad in (128, 256, 512, 1024)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels are compiled and run for real")
def test_kernels_compile_for_sm86_and_sm90_within_their_shared_memory():
    """Every tile plan of the fused kernel as launched at 1.28M x 82k (D = 768 for D_PAD 1024), compiled for sm_86
    and sm_90: it takes at most the shared memory its plan states (the figure the launch chooses by), the smallest
    half-precision plan fits sm_86's 99 KiB, and no plan spills registers but float32's at D_PAD 1024 (documented);
    nor does the top-k path's gather kernel at D_PAD 256 to 1024."""
    from test_similarity_topk import compile_for

    def mix_launch(dtype, d_pad, plan):
        d = 768 if d_pad == 1024 else d_pad
        constants = dict(kernel.mix_constants(plan, d_pad, dtype), DOT_IN_FP32=False)  # the interpreter's bf16 widening
        ints = dict(N=1_281_167, M=82_115, D=d, stride_in=d, stride_id=1, stride_nm=d, stride_nd=1, stride_on=d)
        return dict(module="semantic_mix", kernel="_mix_kernel", dtype="fp32" if dtype == torch.float32 else "bf16",
                    constants=constants, ints=ints,
                    options=dict(num_warps=plan.num_warps, num_stages=plan.num_stages, **COMPILE_OPTIONS))

    def gather_launch(d_pad):
        block_n, num_warps = kernel.gather_plan(d_pad)
        return dict(module="semantic_mix", kernel="_gather_mix_kernel", dtype="bf16",
                    constants=dict(BLOCK_N=block_n, D_PAD=d_pad), options=dict(num_warps=num_warps, **COMPILE_OPTIONS))

    plans = [(dtype, d_pad, plan) for dtype, d_pad in PLAN_TABLES for plan in kernel.mix_plans(d_pad, dtype)]
    gathers = (256, 512, 1024)
    for arch, limit in SHARED_LIMIT_KIB.items():
        usages = compile_for([mix_launch(*planned) for planned in plans] + [gather_launch(d) for d in gathers],
                             arch=arch)
        for (dtype, d_pad, plan), usage in zip(plans, usages):
            what = f"sm_{arch} {dtype} D_PAD={d_pad} {plan}"
            assert usage["shared"] <= plan.shared_kib * 1024, (what, usage)
            assert usage["STACK"] == 0 or (dtype == torch.float32 and d_pad == 1024), (what, usage)
        for d_pad, usage in zip(gathers, usages[len(plans):]):   # the gather kernel: no spills, little shared
            assert usage["shared"] <= limit * 1024 and usage["STACK"] == 0, (f"sm_{arch} gather D_PAD={d_pad}", usage)
    assert all(kernel.mix_plans(d_pad, dtype)[-1].shared_kib <= SHARED_LIMIT_KIB[86]
               for dtype, d_pad in PLAN_TABLES if dtype != torch.float32)


@pytest.mark.parametrize("dtype, d_pad", PLAN_TABLES)
def test_each_plan_matches_the_reference(device, monkeypatch, dtype, d_pad):
    """A GPU with less shared memory takes a smaller plan (the first that fits its opt-in limit, faked here): each
    plan gives the reference's mixture. The plans come largest first, so a limit at a plan's figure picks it."""
    plans = kernel.mix_plans(d_pad, dtype)
    assert all(a.shared_kib > b.shared_kib for a, b in zip(plans, plans[1:]))
    d = {128: 100, 256: 200, 512: 512, 1024: 768}[d_pad]
    gen = torch.Generator().manual_seed(d_pad)
    images, nouns = unit_rows(19, d, gen, device, dtype), unit_rows(70, d, gen, device, dtype)
    expected = reference.semantic_mix(images, nouns, 0.01)
    launched = []
    real_constants = kernel.mix_constants
    monkeypatch.setattr(kernel, "mix_constants",
                        lambda plan, *args: launched.append(plan) or real_constants(plan, *args))
    for plan in plans:
        monkeypatch.setattr(kernel, "shared_memory_kib", lambda device, kib=plan.shared_kib: kib)
        torch.testing.assert_close(triton_mix(images, nouns, 0.01), expected, rtol=0,
                                   atol=FP32_ATOL if dtype == torch.float32 else HALF_ATOL[dtype])
    assert launched == list(plans)


def test_the_limit_is_the_opt_in_shared_memory_a_block_of_a_cuda_device(monkeypatch):
    # A kernel may opt in beyond the default 48 KiB a block (227 KiB on sm_90): that is the figure plans go by.
    import types

    props = types.SimpleNamespace(shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=227 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    kernel.shared_memory_kib.cache_clear()
    try:
        assert kernel.shared_memory_kib(torch.device("cuda", 0)) == 227.0
        assert kernel.shared_memory_kib(torch.device("cpu")) is None
    finally:
        kernel.shared_memory_kib.cache_clear()
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:   # the real one: 99 KiB or more
        monkeypatch.undo()
        assert kernel.shared_memory_kib(torch.device("cuda", torch.cuda.current_device())) >= 99


def test_a_gpu_with_too_little_shared_memory_is_told_why(monkeypatch):
    # float32 at D = 768 needs 128 KiB a block: an sm_86 card (99 KiB) takes the reference, and a forced Triton
    # backend says why; half precision has a plan that fits there.
    assert kernel.shared_memory_why_not(512, torch.bfloat16, 99.0) is None
    assert kernel.shared_memory_why_not(768, torch.bfloat16, 99.0) is None
    assert kernel.shared_memory_why_not(768, torch.float32, 227.0) is None
    assert kernel.shared_memory_why_not(768, torch.float32, None) is None       # off CUDA: no limit
    assert kernel.shared_memory_why_not(100, torch.float32, 99.0) is None       # float32 below D = 512 fits there
    why = kernel.shared_memory_why_not(768, torch.float32, 99.0)
    assert why == ("the fused kernel's smallest tile plan at D=768 (torch.float32) needs 128 KiB of shared memory "
                   "a block, and this GPU gives 99 KiB")
    monkeypatch.setattr(kernel, "shared_memory_kib", lambda device: 99.0)
    gen = torch.Generator().manual_seed(0)
    images, nouns = unit_rows(3, 768, gen, "cpu"), unit_rows(5, 768, gen, "cpu")
    with pytest.raises(Exception, match="needs 128 KiB of shared memory a block"):
        triton_mix(images, nouns, 0.1)
    # The custom op, called without the dispatcher, says the same (an AttributeError of a missing plan before).
    with pytest.raises(RuntimeError, match="semantic_mix: the fused kernel's smallest tile plan at D=768"):
        torch.ops.laic_triton.semantic_mix(images, nouns, 0.1, None)
    assert triton_mix(images, nouns, 0.1, topk=2).shape == (3, 768)   # the top-k path has no such tile


def test_tied_logits_keep_the_lower_noun_index_on_every_backend(device):
    # Nouns 0 and 2 tie for the second place (logit 0): the lower index is kept, as similarity_topk breaks ties (the
    # reference used torch.topk, whose order for ties is unspecified, and disagreed with the kernel).
    images = torch.tensor([[1.0, 0.0, 0.0]], device=device)
    nouns = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]], device=device)
    weights = torch.softmax(torch.tensor([1.0, 0.0]), dim=0)
    expected = F.normalize(weights[0] * nouns[3].cpu() + weights[1] * nouns[0].cpu(), dim=0)
    for mix in (reference.semantic_mix(images, nouns, 1.0, topk=2), triton_mix(images, nouns, 1.0, topk=2)):
        torch.testing.assert_close(mix.cpu()[0], expected)


def test_nouns_are_chosen_by_similarity_where_dividing_by_tau_ties_their_logits(device):
    # Two adjacent float32 similarities whose quotients by tau round to one logit: the noun of the larger
    # similarity is chosen on every backend (the reference once ranked the logits and took the lower index).
    tau = 3.0
    sims = torch.linspace(1.5, 1.99, 1000)
    above = torch.nextafter(sims, torch.full_like(sims, 3.0))
    tied = ((sims / tau) == (above / tau)).nonzero()[0, 0]
    low, high = float(sims[tied]), float(above[tied])   # exact: float32 values held as Python floats
    assert low < high
    images = torch.tensor([[1.0, 0.0]], device=device)
    nouns = torch.tensor([[low, 5.0], [high, -5.0]], device=device)
    expected = F.normalize(nouns[1:].cpu(), dim=1)[0]
    for mix in (reference.semantic_mix(images, nouns, tau, topk=1), triton_mix(images, nouns, tau, topk=1)):
        torch.testing.assert_close(mix.cpu()[0], expected)


def test_the_kernels_without_a_backward_leave_inputs_that_require_grad_to_the_reference():
    from laic_kernels.semantic_mix import BACKENDS as MIX
    from laic_kernels.similarity_topk import BACKENDS as TOPK

    q = torch.randn(6, 4, requires_grad=True)
    for backends, args in ((MIX, (q, q.detach(), 0.5)), (TOPK, (q, q.detach(), 2))):
        triton_backend = next(b for b in backends if b.name == "triton")
        assert "requires grad" in triton_backend.why_not(*args, forced=True)
        with torch.no_grad():
            assert triton_backend.why_not(*args, forced=True) is None
    mixed = laic_kernels.semantic_mix(q, q.detach(), 0.5)
    mixed.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("topk", [None, 3])
def test_the_mixture_of_inputs_that_require_grad_has_the_formulas_gradient(topk):
    """Inputs that require grad go to the reference, differentiated in both inputs: against autograd through the
    formula in float64 (the test above asks only for a finite gradient, of the images alone)."""
    gen = torch.Generator().manual_seed(21)
    images = torch.randn(6, 5, generator=gen).requires_grad_(True)
    nouns = torch.randn(9, 5, generator=gen).requires_grad_(True)
    upstream = torch.randn(6, 5, generator=gen)
    (laic_kernels.semantic_mix(images, nouns, 0.7, topk=topk) * upstream).sum().backward()
    x, n = images.detach().double().requires_grad_(True), nouns.detach().double().requires_grad_(True)
    logits = x @ n.t() / 0.7
    if topk is not None:   # random rows: no ties at the cut
        cut = logits.detach().topk(topk, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits.detach() < cut, float("-inf"))
    (F.normalize(torch.softmax(logits, dim=1) @ n, dim=1) * upstream.double()).sum().backward()
    torch.testing.assert_close(images.grad.double(), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nouns.grad.double(), n.grad, rtol=1e-4, atol=1e-5)
