"""consistent_neighbours(image_features, text_features, k): the fused Triton kernel (interpreter on CPU, compiled on
CUDA) against the composition it replaces, two knn_graph calls and the list filter (checked in test_knn_graph.py
against a plain loop)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip(
    "triton", reason="Triton is not installed (a CPU-only torch does not bring it); its kernels' tests need it")

import laic_kernels
from laic_kernels.triton import COMPILE_OPTIONS
from laic_kernels import consistent_neighbours, knn_graph
from laic_kernels.backends import explain
from laic_kernels.triton import consistent_neighbours as kernel

from conftest import poisoned_like
from test_similarity_topk import SM90_SHARED_LIMIT, compile_for


def composition(image, text, k, backend="reference"):
    """What the fused op replaces: both graphs on ``backend``, then the filter on the lists."""
    with laic_kernels.use_backend(backend):
        image_graph = knn_graph(image, k)[1]
        text_graph = knn_graph(text, k)[1]
    return consistent_neighbours(image_graph, text_graph) + (image_graph, text_graph)


def fused(image, text, k):
    with laic_kernels.use_backend("triton"):
        return consistent_neighbours(image, text, k, return_graphs=True)


def assert_contract(indices, mask, n, k):
    """Padded indices and mask as documented: int64 / bool [N, k], kept entries left, -1 padding, >= 1 per row."""
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    assert mask.shape == (n, k) and mask.dtype == torch.bool
    assert bool((mask.sum(1) >= 1).all())
    assert bool((mask[:, :-1] >= mask[:, 1:]).all())   # True entries first
    assert bool((indices[~mask] == -1).all()) and bool(((indices[mask] >= 0) & (indices[mask] < n)).all())
    assert not bool((indices == torch.arange(n, device=indices.device)[:, None]).any())


def assert_same(outputs, expected):
    for name, out, ref in zip(("indices", "mask", "image graph", "text graph"), outputs, expected):
        assert torch.equal(out.cpu(), ref.cpu()), name


def two_views(n, d_image, d_text, noise, seed, device, dtype=torch.float32):
    """Image features and a text view that agrees with them more (small noise) or less (large noise)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d_image, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))   # any row scale
    mixed = image[:, :min(d_image, d_text)]
    text = torch.randn(n, d_text, generator=gen) * noise
    text[:, :mixed.shape[1]] += mixed
    return image.to(device, dtype), text.to(device, dtype)


@pytest.mark.parametrize("n, d_image, d_text, k, noise", [
    (70, 24, 24, 5, 1.0),      # two row blocks, N not a multiple of the tile
    (37, 16, 40, 1, 1.0),      # k = 1, different feature dimensions
    (37, 20, 20, 36, 1.0),     # k = N - 1: every other row in both lists
    (130, 33, 17, 10, 3.0),    # three key tiles, odd D, a noisy text view (rows with nothing kept)
    (2, 8, 8, 1, 1.0),         # the smallest input
])
def test_matches_composition_fp32(device, n, d_image, d_text, k, noise):
    image, text = two_views(n, d_image, d_text, noise, n + k, device)
    outputs = fused(image, text, k)
    assert_contract(*outputs[:2], n, k)
    assert_same(outputs, composition(image, text, k))
    if noise > 1.0:   # the fallback ran: some row kept only its best image neighbour, which the text list lacks
        lone = (outputs[1].sum(1) == 1)
        fallback = lone & ~(outputs[3] == outputs[2][:, :1]).any(1)
        assert bool(fallback.any()) and 0 < outputs[1].float().mean() < 1


@pytest.mark.parametrize("n, k", [(130, 10), (70, 40)])
def test_every_plan_matches_the_composition(device, n, k):
    """Whichever plan tuning picks on a GPU (two or three at k <= 32, one beyond), the outputs are the composition's:
    rows and keys past a tile's end, and a noisy text view so that some rows keep only their fallback neighbour."""
    image, text = two_views(n, 24, 24, 3.0, n + k, device)
    units = [torch.nn.functional.normalize(x, dim=1) for x in (image, text)]
    expected = composition(image, text, k)
    for plan in kernel.plans(k):
        for mask_poison in (False, True):
            indices, image_graph, text_graph = (poisoned_like(torch.empty(n, k, dtype=torch.int64, device=device))
                                                for _ in range(3))
            mask = torch.full((n, k), mask_poison, dtype=torch.bool, device=device)
            kernel.consistent_neighbours_into(*units, k, indices, mask, image_graph, text_graph, plan=plan)
            assert_same([indices, mask, image_graph, text_graph], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_composition(device, dtype):
    image, text = two_views(90, 32, 32, 1.0, 3, device, dtype)
    outputs = fused(image, text, 6)
    assert_contract(*outputs[:2], 90, 6)
    assert_same(outputs, composition(image, text, 6))


def test_mixed_dtypes_match_composition(device):
    """bf16 images with float32 texts: both computed in float32, as the composition does for its float32 side."""
    image, text = two_views(50, 16, 16, 1.0, 4, device)
    image = image.bfloat16()
    assert_same(fused(image, text, 4), composition(image, text, 4))


def exact_unit_rows(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` distinct rows with four entries of +-0.5 and zeros elsewhere: unit rows whose products are multiples of
    0.25, exact in float32 whatever the order of the sums (kernels and BLAS block them differently), so equal
    similarities are equal on every path."""
    rows = set()
    while len(rows) < n:
        where = torch.randperm(dim, generator=gen)[:4]
        row = [0.0] * dim
        for i, sign in zip(where.tolist(), torch.randint(0, 2, (4,), generator=gen).tolist()):
            row[i] = 0.5 if sign else -0.5
        rows.add(tuple(row))
    return torch.tensor(sorted(rows))


def test_duplicate_rows_tie_like_the_triton_composition(device):
    """Every row three times in both spaces: equal similarities everywhere. Ties break as similarity_topk's kernel
    breaks them (smaller index first), so the fused op equals the composition on the triton backend exactly."""
    gen = torch.Generator().manual_seed(6)
    image = exact_unit_rows(23, 12, gen)[torch.arange(69) % 23].to(device)
    text = exact_unit_rows(23, 12, gen)[torch.arange(69) % 23].to(device)
    outputs = fused(image, text, 4)
    assert_contract(*outputs[:2], 69, 4)
    assert_same(outputs, composition(image, text, 4, backend="triton"))
    # The two twins of a row are its best neighbours in both spaces, so both are kept, smaller index first.
    twins = torch.stack([(torch.arange(69) + 23) % 69, (torch.arange(69) + 46) % 69], 1).sort(1).values
    assert torch.equal(outputs[0][:, :2].cpu(), twins) and bool(outputs[1][:, :2].all())


@pytest.mark.parametrize("return_graphs", [False, True])
def test_poisoned_strided_outputs(device, return_graphs):
    """Every output element is written, through row strides wider than k, and nothing beyond the k columns."""
    n, k, extra = 70, 6, 3
    image, text = two_views(n, 20, 20, 2.0, 9, device)
    units = [torch.nn.functional.normalize(x, dim=1) for x in (image, text)]
    expected = composition(image, text, k)
    for mask_poison in (False, True):
        buffers = [torch.full((n, k + extra), n + 7, dtype=torch.int64, device=device),
                   torch.full((n, k + extra), mask_poison, dtype=torch.bool, device=device)]
        if return_graphs:
            buffers += [torch.full((n, k + extra), -1, dtype=torch.int64, device=device) for _ in range(2)]
        kernel.consistent_neighbours_into(*units, k, *(b[:, :k] for b in buffers))
        assert_same([b[:, :k] for b in buffers], expected)
        for b, poison in zip(buffers, (n + 7, mask_poison, -1, -1)):
            assert bool((b[:, k:] == poison).all())


def test_old_entry_unchanged_and_errors():
    image, text = two_views(20, 8, 8, 1.0, 1, "cpu")
    lists = composition(image, text, 3)
    assert_same(consistent_neighbours(image, text, 3, return_graphs=True), lists)   # automatic: the composition
    assert_same(consistent_neighbours(image, text, 3), lists[:2])
    with pytest.raises(ValueError, match="return_graphs=True needs features and k"):
        consistent_neighbours(lists[2], lists[3], return_graphs=True)
    with pytest.raises(ValueError, match="integer tensor.*pass features and k"):
        consistent_neighbours(image, text)
    # Lists a graph cannot have: before, the filter returned the repeats ([[1, 1], ...]) or the row itself.
    good = torch.tensor([[1, 2], [0, 2], [0, 1]])
    for bad, match in ((torch.tensor([[1, 1], [0, 2], [0, 1]]), "text_neighbours has a row that lists a neighbour "
                        "twice"), (torch.tensor([[1, 2], [1, 2], [0, 1]]), "text_neighbours has a row that lists "
                        "itself"), (torch.tensor([[1, 3], [0, 2], [0, 1]]), "text_neighbours has entries outside")):
        with pytest.raises(ValueError, match=match):
            consistent_neighbours(good, bad)
    assert_same(consistent_neighbours(good, good.flip(1)), (good, torch.ones(3, 2, dtype=torch.bool)))


def test_neighbour_lists_given_with_k_are_told_to_drop_k():
    # It said "image_features must be float32 ... convert it with .float()": graphs of the indices as features.
    lists = torch.tensor([[1, 2], [0, 2], [0, 1]])
    with pytest.raises(ValueError, match=r"integer tensors .*neighbour lists.* k = 2 was given.*drop k.*pass float "
                                         r"features") as refusal:
        consistent_neighbours(lists, lists.flip(1), 2)
    assert ".float()" not in str(refusal.value)
    # As advised, without k: every image neighbour is in the text list (the same two, in the other order).
    assert_same(consistent_neighbours(lists, lists.flip(1)), (lists, torch.ones(3, 2, dtype=torch.bool)))


def test_features_that_require_grad_take_the_fast_backends_and_record_nothing(device):
    """No output is differentiable (int64 indices, a bool mask, int64 graphs): features that require grad (an
    encoder's output, a parameter) were turned away from the symmetric and triton backends ("an input requires grad
    and this kernel has no backward"), and the unit rows were recorded for a backward that never comes."""
    image, text = two_views(40, 8, 6, 1.0, 5, device)
    expected = composition(image, text, 3)
    image = image.clone().requires_grad_(True)
    assert explain("consistent_neighbours", image, text, 3)["symmetric"] is None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        for backend in ("symmetric", "triton", "reference", None):
            with laic_kernels.use_backend(backend):
                outputs = consistent_neighbours(image, text, 3, return_graphs=True)
            assert_same(outputs, expected)
            assert not any(out.requires_grad for out in outputs)
    assert saved == []   # autograd saved no tensor for a backward


@pytest.mark.parametrize("image, text, k, match", [
    (torch.randn(5, 8), torch.randn(6, 8), 2, "same N rows"),
    (torch.randn(5, 8), torch.randn(5, 8), 5, "k must be between 1 and 4"),
    (torch.randn(5, 8), torch.randn(5, 8), 0, "k must be between 1 and 4"),
    (torch.randn(1, 8), torch.randn(1, 8), 1, "image_features must have at least 2 rows"),
    (torch.randn(5, 8), torch.full((5, 8), float("nan")), 2, "text_features contains NaN"),
    (torch.randn(5, 8), torch.ones(5, 8, dtype=torch.int64), 2, "text_features must be float32"),
])
def test_bad_feature_inputs(image, text, k, match):
    with pytest.raises(ValueError, match=match):
        consistent_neighbours(image, text, k)


def test_dispatch_reasons(device):
    image, text = two_views(200, 8, 8, 1.0, 2, device)
    from laic_kernels.consistent_neighbours import BACKENDS
    triton_backend = next(b for b in BACKENDS if b.name == "triton")
    if device.type == "cpu":
        assert "forced" in triton_backend.why_not(image, text, 3, False, forced=False)
    else:
        assert triton_backend.why_not(image, text, 3, False, forced=False) is None
    with pytest.raises(RuntimeError, match="on-chip top-k limit"):
        fused(image, text, 129)


def test_custom_op_fake_kernel_and_opcheck():
    op = torch.ops.laic_triton.consistent_neighbours.default
    with FakeTensorMode():
        outputs = op(torch.empty(10, 8), torch.empty(10, 4), 3, True)
    assert [tuple(o.shape) for o in outputs] == [(10, 3)] * 4
    assert [o.dtype for o in outputs] == [torch.int64, torch.bool, torch.int64, torch.int64]
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(12, 8, generator=gen), torch.randn(12, 8, generator=gen), 3, False)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels are compiled and run for real")
def test_kernel_compiles_for_sm90_within_shared_memory():
    """Compile the kernel as launched on an H100/H200 at N = 1.28M (tile plan, dot precision, warps, the launcher's
    specialisation): shared memory within the limit everywhere, and pipelined loads and no register spills in every
    plan tuning may pick for bf16 at k = 10 (with and without the lists), 20 and 60, and float32 at k = 10."""
    pointers = {"mask_ptr": "*u8", "image_graph_ptr": "*i64", "text_graph_ptr": "*i64"}
    def launch(plan, dtype, k, return_graphs, precision):
        constants = kernel.kernel_constants(plan, k, 512, 512, return_graphs, precision, False)
        ints = dict(N=1_281_167, D_IMG=512, D_TXT=512, stride_in=512, stride_id=1, stride_tn=512, stride_td=1,
                    stride_on=k, stride_mn=k, stride_gn=k)
        return dict(module="consistent_neighbours", kernel="_consistent_kernel", dtype=dtype, constants=constants,
                    options=dict(num_warps=plan.num_warps, **COMPILE_OPTIONS), pointers=pointers, ints=ints)

    checked = [launch(plan, "bf16", 10, False, "tf32") for plan in kernel.plans(10)]
    checked += [launch(plan, "bf16", k, True, "tf32") for k in (10, 20, 60) for plan in kernel.plans(k)]
    checked.append(launch(kernel.plans(10)[0], "fp32", 10, True, "tf32x3"))
    usages = compile_for(checked + [launch(kernel.plans(128)[0], "bf16", 128, True, "tf32")])
    for launched, usage in zip(checked, usages):
        c = launched["constants"]
        what = (f"{launched['dtype']} k={c['K']} {c['BLOCK_N']}x{c['BLOCK_M']}/{launched['options']['num_warps']}w"
                f"{' + graphs' if c['WRITE_GRAPHS'] else ''}")
        assert usage["STACK"] == 0, f"{what} spills {usage['STACK']} bytes per thread ({usage['REG']} registers)"
        assert usage["pipelined"], f"{what}: loads not pipelined"
    for usage in usages:
        assert usage["shared"] <= SM90_SHARED_LIMIT, usage


def test_real_clip_features_match_the_compositions(shared_data):
    """fp16 CLIP ViT-B/32 images and their text counterparts (many near-ties): the fused op equals the triton
    composition exactly, and its image graph is the reference's up to rounding."""
    import numpy as np
    images = torch.from_numpy(np.load(shared_data / "cifar10-test-first500" / "features.npy")[:200])
    nouns = torch.from_numpy(np.load(shared_data / "vocab" / "embeddings.npy")).float()
    texts = laic_kernels.semantic_mix(images.float(), nouns, 0.005)
    outputs = fused(images, texts, 10)
    assert_contract(*outputs[:2], 200, 10)
    assert_same(outputs, composition(images, texts, 10, backend="triton"))
    _, _, ref_image_graph, _ = composition(images, texts, 10)
    unit = torch.nn.functional.normalize(images.float(), dim=1).half().double()
    at_fused = (unit[:, None, :] * unit[outputs[2]]).sum(-1)
    at_ref = (unit[:, None, :] * unit[ref_image_graph]).sum(-1)
    torch.testing.assert_close(at_fused, at_ref, atol=1e-5, rtol=0)
    assert 0.1 < outputs[1].float().mean() < 0.9   # the text side agrees on some neighbours, not all
