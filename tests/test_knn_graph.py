"""knn_graph against scikit-learn's brute-force cosine neighbours; consistent_neighbours against a plain loop."""
import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

import laic_kernels
from laic_kernels import consistent_neighbours, knn_graph, reference


def sklearn_knn(features: torch.Tensor, k: int):
    """Cosine similarities and indices of the k nearest other rows (sklearn returns the row itself first)."""
    x = features.double().cpu().numpy()
    distances, indices = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x).kneighbors(x)
    keep = indices != np.arange(len(x))[:, None]
    # Drop self (wherever a tie put it), keep the first k others.
    sims = np.stack([(1 - d)[m][:k] for d, m in zip(distances, keep)])
    idx = np.stack([i[m][:k] for i, m in zip(indices, keep)])
    return torch.from_numpy(sims), torch.from_numpy(idx)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("n, k", [(37, 5), (2, 1), (40, 39)])
def test_knn_graph_matches_sklearn(device, backend, n, k):
    gen = torch.Generator().manual_seed(n + k)
    features = (torch.randn(n, 24, generator=gen) * torch.rand(n, 1, generator=gen) * 5).to(device)  # any row scale
    with laic_kernels.use_backend(backend):
        values, indices = knn_graph(features, k)
    ref_values, ref_indices = sklearn_knn(features, k)
    assert values.shape == (n, k) and values.dtype == torch.float32 and indices.dtype == torch.int64
    torch.testing.assert_close(values.double().cpu(), ref_values, atol=1e-5, rtol=0)
    assert not bool((indices.cpu() == torch.arange(n)[:, None]).any())
    for row, ref_row in zip(indices.cpu().tolist(), ref_indices.tolist()):
        assert set(row) == set(ref_row)   # recall@k = 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_knn_graph_half_precision(device, dtype):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(30, 32, generator=gen).to(device, dtype)
    with laic_kernels.use_backend("triton"):
        values, indices = knn_graph(features, 4)
    # The similarities at the returned indices, from the half-precision unit rows the kernel saw.
    # (Rounded to half precision they are only unit to ~1e-3, so cosine and dot product differ by that much.)
    unit = torch.nn.functional.normalize(features.float(), dim=1).to(dtype)
    at_indices = (unit.double()[:, None, :] * unit.double()[indices]).sum(-1)
    torch.testing.assert_close(values.double(), at_indices, atol=1e-5, rtol=0)
    ref_values, _ = reference.similarity_topk(unit, unit, 4, exclude_self=True)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, exponents", [(torch.float32, (70, -60, 0)), (torch.float64, (900, -900, 0))])
def test_rows_of_any_scale_have_the_neighbours_of_the_unscaled_rows(dtype, exponents):
    """Each row multiplied by its own power of two, to where float32's sum of squares overflows (or float64 rows
    leave float32's range) or the norm falls under F.normalize's floor: the same graph, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(45, 24, generator=gen, dtype=dtype)
    scale = torch.tensor(exponents)[torch.randint(len(exponents), (45, 1), generator=gen)]
    expected = knn_graph(features, 5)
    got = knn_graph(torch.ldexp(features, scale.to(dtype)), 5)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_unit_rows_in_blocks(monkeypatch, dtype):
    """Blocks of rows (7 rows of 13 here: the last one short) give F.normalize's rows in the kept dtype, zero rows
    zero; for half precision the peak extra memory is the output and a block's float32 temporaries, not the whole
    float32 copy and its normalised rows."""
    import importlib

    from laic.profiling import FitProfiler, step
    module = importlib.import_module("laic_kernels.knn_graph")   # the module (the package exports the function)

    gen = torch.Generator().manual_seed(0)
    features = (torch.randn(4003, 13, generator=gen) * 5).to(dtype)
    features[17] = 0
    monkeypatch.setattr(module, "UNIT_BLOCK_ELEMENTS", 7 * 13)
    expected = torch.nn.functional.normalize(features.float(), dim=1)
    expected = expected.to(dtype) if dtype != torch.float64 else expected
    unit = module.unit_rows(features)
    assert unit.dtype == expected.dtype and torch.equal(unit, expected)
    assert bool((unit[17] == 0).all())
    if dtype == torch.bfloat16:
        features = torch.randn(20000, 64, generator=gen).to(dtype)
        monkeypatch.setattr(module, "UNIT_BLOCK_ELEMENTS", 1000 * 64)
        profiler = FitProfiler(torch.device("cpu"))
        with profiler.recording():
            with step("unit rows", "other"):
                module.unit_rows(features)
        output, float32_block = features.numel() * 2, 1000 * 64 * 4
        assert output <= profiler.steps[0]["peak_extra_bytes"] <= output + 4 * float32_block, profiler.steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_float32_holds_one_temporary(dtype):
    """The exact rescaling and the normalisation work in place on one [N, D] float32 result (at 1.28M x 512 a
    second copy is 2.6 GB; the first version held two): peak extra memory the output, the float64 rescaled copy
    for float64 rows, and row vectors; the input untouched."""
    from laic.profiling import FitProfiler, step
    from laic_kernels.knn_graph import unit_float32

    features = torch.randn(100_000, 64, generator=torch.Generator().manual_seed(0), dtype=dtype)
    before = features.clone()
    profiler = FitProfiler(torch.device("cpu"))
    with profiler.recording():
        with step("unit rows", "other"):
            unit = unit_float32(features)
    output = features.numel() * 4
    rescaled = features.numel() * 8 if dtype == torch.float64 else 0
    row_vectors = 48 * features.shape[0]   # extremes, exponents, powers of two, norms: a few numbers a row
    assert output <= profiler.steps[0]["peak_extra_bytes"] <= output + rescaled + row_vectors + (1 << 20)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(before.float(), dim=1), rtol=0, atol=0)
    assert torch.equal(features, before)


def test_knn_graph_duplicate_rows(device):
    """Each row appears twice: its twin is its nearest neighbour at cosine 1, and indices stay distinct."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(15, 16, generator=gen)
    features = torch.cat([base, 2 * base]).to(device)   # the twin at another scale: same direction
    with laic_kernels.use_backend("triton"):
        values, indices = knn_graph(features, 3)
    twins = (torch.arange(30, device=device) + 15) % 30
    assert bool((indices[:, 0] == twins).all())
    torch.testing.assert_close(values[:, 0], torch.ones(30, device=device), atol=1e-5, rtol=0)
    assert all(len(set(row)) == 3 for row in indices.tolist())


@pytest.mark.parametrize("features, k, match", [
    (torch.randn(1, 8), 1, "at least 2 rows"),
    (torch.randn(5, 8), 5, "k must be between 1 and 4"),
    (torch.randn(5, 8), 0, "k must be between 1 and 4"),
    (torch.randn(5), 1, "2 dimensions"),
    (torch.ones(5, 8, dtype=torch.int64), 1, "float32"),
    (torch.full((5, 8), float("nan")), 1, "NaN"),
])
def test_knn_graph_bad_inputs(features, k, match):
    with pytest.raises(ValueError, match=match):
        knn_graph(features, k)


def loop_consistent_neighbours(image, text):
    """The filtering rule, written out row by row."""
    indices, mask = [], []
    for img_row, txt_row in zip(image.tolist(), text.tolist()):
        kept = [j for j in img_row if j in txt_row] or img_row[:1]
        indices.append(kept + [-1] * (len(img_row) - len(kept)))
        mask.append([True] * len(kept) + [False] * (len(img_row) - len(kept)))
    return torch.tensor(indices), torch.tensor(mask)


def test_consistent_neighbours_hand_made_graph(device):
    image = torch.tensor([[1, 2],    # text agrees on 2 only
                          [0, 2],    # text agrees on nothing: falls back to the best image neighbour, 0
                          [3, 0],    # text agrees on both (in another order): image-space order is kept
                          [4, 1],    # text agrees on the second only: compacted to the left
                          [0, 3]], device=device)
    text = torch.tensor([[2, 4],
                         [3, 4],
                         [0, 3],
                         [1, 0],
                         [3, 2]], device=device)
    indices, mask = consistent_neighbours(image, text)
    assert indices.tolist() == [[2, -1], [0, -1], [3, 0], [1, -1], [3, -1]]
    assert mask.tolist() == [[True, False], [True, False], [True, True], [True, False], [True, False]]
    assert indices.dtype == torch.int64 and mask.dtype == torch.bool and indices.device == image.device


def test_consistent_neighbours_matches_loop_on_real_graphs(device):
    gen = torch.Generator().manual_seed(8)
    images = torch.randn(60, 12, generator=gen).to(device)
    texts = (images + 1.5 * torch.randn(60, 12, generator=gen).to(device))   # a noisy second view
    image_graph = knn_graph(images, 6)[1]
    text_graph = knn_graph(texts, 6)[1].int()   # any integer dtype
    indices, mask = consistent_neighbours(image_graph, text_graph)
    ref_indices, ref_mask = loop_consistent_neighbours(image_graph.cpu(), text_graph.cpu())
    assert torch.equal(indices.cpu(), ref_indices) and torch.equal(mask.cpu(), ref_mask)
    assert bool((mask.sum(1) >= 1).all()) and 0 < mask.float().mean() < 1


# Valid lists of 4 rows (each row's other rows), so that each case below fails for its own reason.
_OTHERS = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


@pytest.mark.parametrize("image, text, match", [
    (_OTHERS, _OTHERS[:, :2], "same shape"),
    (torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long), "integer tensor"),
    (torch.zeros(4, 3, dtype=torch.bool), torch.zeros(4, 3, dtype=torch.long), "integer tensor"),
    (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), r"\[N, k\]"),
    (torch.full((4, 3), 4), torch.zeros(4, 3, dtype=torch.long), r"outside \[0, N\)"),
    (_OTHERS, torch.full((4, 3), -1), r"outside \[0, N\)"),
    ([[1, 2]], torch.zeros(1, 2, dtype=torch.long), "torch.Tensor"),
])
def test_consistent_neighbours_bad_inputs(image, text, match):
    with pytest.raises(ValueError, match=match):
        consistent_neighbours(image, text)


def test_knn_graph_on_real_clip_features(shared_data):
    """fp16 CLIP ViT-B/32 image features (many near-ties): the kernel's graph is a valid exact top-k."""
    features = torch.from_numpy(np.load(shared_data / "cifar10-test-first500" / "features.npy")[:200])
    with laic_kernels.use_backend("triton"):
        values, indices = knn_graph(features, 10)
    ref_values, _ = knn_graph(features, 10)   # automatic mode on CPU: the reference
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=0)
    unit = torch.nn.functional.normalize(features.float(), dim=1).half().double()
    at_indices = (unit[:, None, :] * unit[indices]).sum(-1)
    # Every returned neighbour is at least as close as the reference's k-th (equal up to rounding on ties).
    assert bool((at_indices >= ref_values[:, -1:].double() - 1e-5).all())
    assert not bool((indices == torch.arange(200)[:, None]).any())
