"""laic.operands: half-precision candidate search with float32 re-scoring chooses what the float32 search chooses."""
import pytest
import torch
import torch.nn.functional as F

import laic.operands as operands
from laic import stage0
from laic import kmeans
from laic.kmeans import spherical_kmeans
from laic_kernels import knn_graph, similarity_topk


def near_tied_rows(n: int, dim: int, seed: int, spread: float = 1e-2) -> torch.Tensor:
    """Unit rows in tight bunches around a few directions: many similarities differ by less than bfloat16's
    rounding (about 1e-3 here), so a bfloat16 search orders them differently from a float32 one, but by more than
    float32's (a spread of 2e-3 makes float32 ties, whose order only the rounding of each product decides)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(2, n // 12), dim, generator=g), dim=1)
    rows = centres[torch.randint(len(centres), (n,), generator=g)] + spread * torch.randn(n, dim, generator=g)
    return F.normalize(rows, dim=1)


def plain_half_search(queries, keys, k, exclude_self=False):
    return similarity_topk(queries.bfloat16(), keys.bfloat16(), k, exclude_self=exclude_self)


@pytest.mark.parametrize("n,m,dim,k", [(97, 61, 33, 5), (130, 300, 64, 1), (40, 45, 17, 36)])
def test_top_similar_in_half_precision_chooses_as_float32(n, m, dim, k):
    queries = near_tied_rows(n, dim, seed=n)
    keys = torch.cat([near_tied_rows(m - 3, dim, seed=m), queries[:3]])      # some exact matches too
    want_values, want = similarity_topk(queries, keys, k)
    _, plain = plain_half_search(queries, keys, k)
    assert not torch.equal(plain, want), "the inputs must be ones that bfloat16 alone orders differently"
    with operands.half_operands():
        values, got = operands.top_similar(queries, keys, k)
    assert values.dtype == torch.float32
    assert torch.equal(got, want)
    torch.testing.assert_close(values, want_values, rtol=0, atol=2e-6)


@pytest.mark.parametrize("n,k", [(101, 10), (23, 20)])   # k + margin clipped to N - 1 in the second
def test_knn_in_half_precision_equals_the_float32_graph(n, k):
    x = near_tied_rows(n, 24, seed=3 * n) * torch.rand(n, 1, generator=torch.Generator().manual_seed(1)).add(0.5)
    want_values, want = knn_graph(x, k)
    with operands.half_operands():
        values, got = operands.knn(x, k)
    assert torch.equal(got, want)
    assert not (got == torch.arange(n)[:, None]).any()
    torch.testing.assert_close(values, want_values, rtol=0, atol=2e-6)


def test_rescored_breaks_ties_by_lower_index_and_keeps_only_candidates():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    candidates = torch.tensor([[4, 2, 0, 1], [4, 1, 0, 2]])
    values, indices = operands.rescored(queries, keys, candidates, 3)
    assert indices.tolist() == [[0, 2, 4], [1, 4, 0]]     # key 3 (the best for row 1) was not a candidate
    torch.testing.assert_close(values, torch.tensor([[1.0, 1.0, 0.8], [0.8, 0.6, 0.0]]))


def test_rescored_streams_row_blocks(monkeypatch):
    monkeypatch.setattr(operands, "BLOCK_ELEMENTS", 100)     # a few rows a block
    queries, keys = near_tied_rows(50, 8, seed=5), near_tied_rows(70, 8, seed=6)
    _, candidates = similarity_topk(queries, keys, 12)
    values, indices = operands.rescored(queries, keys, candidates, 4)
    want_values, want = similarity_topk(queries, keys, 4)
    assert torch.equal(indices, want)
    torch.testing.assert_close(values, want_values, rtol=0, atol=2e-6)


def test_kmeans_assignment_in_half_precision_chooses_the_float32_nearest_centre(monkeypatch):
    # Rows halfway between two centres: their two similarities differ by less than bfloat16's rounding.
    g = torch.Generator().manual_seed(31)
    centres = F.normalize(torch.randn(6, 48, generator=g), dim=1)
    pairs = torch.randint(6, (400, 2), generator=g)
    x = F.normalize(centres[pairs[:, 0]] + centres[pairs[:, 1]] + 1e-2 * torch.randn(400, 48, generator=g), dim=1)
    want_sims, want, _ = kmeans._assign(x, centres, with_sums=False)
    with operands.half_operands():
        sims, got, _ = kmeans._assign(x, centres, with_sums=False)
        monkeypatch.setattr(kmeans, "ASSIGNMENT_MARGIN", 0)      # the half-precision choice alone
        _, plain, _ = kmeans._assign(x, centres, with_sums=False)
    assert not torch.equal(plain, want), "the rows must be ones that bfloat16 alone assigns differently"
    assert torch.equal(got, want)
    torch.testing.assert_close(sims, want_sims, rtol=0, atol=2e-6)


def test_top_similar_and_knn_name_a_bad_k_in_half_precision():
    x = near_tied_rows(6, 8, seed=1)
    with operands.half_operands():
        with pytest.raises(ValueError, match="k must be"):
            operands.top_similar(x, x[:3], 4)
        with pytest.raises(ValueError, match="k must be"):
            operands.top_similar(x, x, 6, exclude_self=True)
        with pytest.raises(ValueError, match="k must be"):
            operands.knn(x, 0)
        with pytest.raises(ValueError, match="features"):
            operands.knn(x[:1], 1)
    with pytest.raises(ValueError, match="at least k"):
        operands.rescored(x, x, torch.zeros(6, 2, dtype=torch.int64), 3)


def test_kmeans_in_half_precision_equals_float32():
    x = near_tied_rows(300, 32, seed=11, spread=0.05)
    full = spherical_kmeans(x, 7, n_init=2, seed=4)
    with operands.half_operands():
        half = spherical_kmeans(x, 7, n_init=2, seed=4)
    assert torch.equal(half.labels, full.labels)
    torch.testing.assert_close(half.centres, full.centres, rtol=0, atol=1e-6)


def test_stage0_image_graph_and_nouns_in_half_precision_equal_float32():
    x = near_tied_rows(240, 32, seed=12, spread=0.05)
    nouns = F.normalize(torch.randn(90, 32, generator=torch.Generator().manual_seed(13)), dim=1)
    full = stage0.build_semantic_space(x, nouns, 6, seed=2)
    with operands.half_operands():
        half = stage0.build_semantic_space(x, nouns, 6, seed=2)
    assert torch.equal(half.noun_index, full.noun_index)
    assert torch.equal(half.image_neighbours, full.image_neighbours)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_default_half_precision_search_chooses_as_the_cpu_float32_one():
    x = near_tied_rows(301, 64, seed=21)
    queries = near_tied_rows(77, 64, seed=22)
    assert operands.operand_dtype(torch.device("cuda")) in (torch.bfloat16, torch.float16)
    _, want_graph = knn_graph(x, 10)
    _, got_graph = operands.knn(x.cuda(), 10)
    assert torch.equal(got_graph.cpu(), want_graph)
    want_values, want = similarity_topk(queries, x, 3)
    values, got = operands.top_similar(queries.cuda(), x.cuda(), 3)
    assert torch.equal(got.cpu(), want)
    torch.testing.assert_close(values.cpu(), want_values, rtol=0, atol=2e-6)


@pytest.mark.parametrize("n_rows", [1, 7, 5000])
def test_lexicographic_order_is_pythons_stable_sort_of_the_rows_as_tuples(n_rows, device):
    # Few distinct values a column: ties in the leading columns decide by later ones, and whole rows tie (kept in
    # their order); -0.0 and 0.0 are one value. 5000 rows: past the sizes a GPU sorts otherwise.
    g = torch.Generator().manual_seed(n_rows)
    rows = torch.randint(-2, 3, (n_rows, 3), generator=g).float() * 0.5
    rows[torch.rand(n_rows, generator=g) < 0.3, 0] = -0.0
    order = operands.lexicographic_order(rows.to(device))
    assert order.device.type == device.type
    assert order.tolist() == sorted(range(n_rows), key=lambda i: tuple(rows[i].tolist()))


@pytest.mark.parametrize("n_rows", [0, 2, 145])
def test_lexicographic_order_of_unit_rows_tied_in_leading_columns(n_rows, device):
    # Rows as the kept nouns are (unit, 512 columns), some equal in their first columns only, some equal whole.
    g = torch.Generator().manual_seed(n_rows)
    rows = torch.nn.functional.normalize(torch.randn(n_rows, 512, generator=g), dim=1)
    if n_rows > 100:
        rows[40:60, :300] = rows[40, :300]     # tied up to column 300
        rows[70] = rows[3]
        rows[80] = rows[3]
    order = operands.lexicographic_order(rows.to(device))
    assert order.dtype == torch.int64 and order.device.type == device.type
    assert order.tolist() == sorted(range(n_rows), key=lambda i: tuple(rows[i].tolist()))
