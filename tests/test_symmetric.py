"""The symmetric backend (laic_kernels/symmetric.py) of similarity_topk and consistent_neighbours against the
references, on one tile and on many (the tile shrunk through the references' chunk size)."""
import pytest
import torch

import laic_kernels
from laic_kernels import reference, symmetric
from laic_kernels.backends import explain
from laic_kernels.knn_graph import unit_rows
from laic_kernels import chunks


def integer_rows(n: int, d: int, seed: int, device) -> torch.Tensor:
    """Small integers as float32: every dot product is exact whatever the summation order, so both backends see
    the same values and the many exact ties test the lower-index rule itself. A few rows are repeated."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=gen).float()
    x[-3:] = x[:3]
    return x.to(device)


@pytest.fixture(params=[None, 64, 4000], ids=["one-tile", "tile-4", "tile-31"])
def tile_chunk(request, monkeypatch):
    """The references' chunk size, which sets the tile (``symmetric.tile_rows``: a quarter of it, squared)."""
    if request.param is not None:
        monkeypatch.setattr(chunks, "MAX_CHUNK_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize("n, d, k", [(37, 6, 5), (2, 3, 1), (40, 5, 39), (300, 7, 10), (9, 4, 8), (130, 3, 3)])
def test_self_search_equals_the_reference(device, tile_chunk, n, d, k):
    x = integer_rows(n, d, seed=n + k, device=device)
    with laic_kernels.use_backend("symmetric"):
        values, indices = laic_kernels.similarity_topk(x, x, k, exclude_self=True)
    ref_values, ref_indices = reference.similarity_topk(x, x, k, exclude_self=True)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(values, ref_values)
    assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_are_searched_in_float32_like_the_reference(device, tile_chunk, dtype):
    x = integer_rows(45, 5, seed=4, device=device).to(dtype)
    with laic_kernels.use_backend("symmetric"):
        values, indices = laic_kernels.similarity_topk(x, x, 4, exclude_self=True)
    ref_values, ref_indices = reference.similarity_topk(x, x, 4, exclude_self=True)
    assert values.dtype == torch.float32
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


def test_float32_out_whatever_the_default_dtype(monkeypatch):
    monkeypatch.setattr(chunks, "MAX_CHUNK_ELEMENTS", 64)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = integer_rows(20, 4, seed=5, device="cpu").float()
        with laic_kernels.use_backend("symmetric"):
            values, _ = laic_kernels.similarity_topk(x, x, 3, exclude_self=True)
    finally:
        torch.set_default_dtype(before)
    assert values.dtype == torch.float32


@pytest.mark.parametrize("candidates_per_list", [0, 10 ** 6], ids=["column-top-k", "merged-candidates"])
def test_rows_tied_many_times_take_the_column_top_k(device, monkeypatch, candidates_per_list):
    """All rows equal: every entry ties with every row's k-th best; the lowest indices win (the reference's rule),
    whether the column candidates are merged (a large allowance) or each column takes its own best k."""
    monkeypatch.setattr(chunks, "MAX_CHUNK_ELEMENTS", 4 * 8 * 8)    # tiles of 8 rows
    monkeypatch.setattr(symmetric, "MAX_CANDIDATES_PER_LIST", candidates_per_list)
    x = torch.ones(30, 3, device=device)
    x[7] = torch.tensor([1.0, 1.0, 2.0], device=device)    # one row apart
    with laic_kernels.use_backend("symmetric"):
        values, indices = laic_kernels.similarity_topk(x, x, 5, exclude_self=True)
    ref_values, ref_indices = reference.similarity_topk(x, x, 5, exclude_self=True)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


def test_random_unit_rows_across_tiles(device, monkeypatch):
    """Real-valued rows: the same neighbours as the reference, values equal up to float32 rounding."""
    monkeypatch.setattr(chunks, "MAX_CHUNK_ELEMENTS", 4 * 50 * 50)        # tiles of 50 rows
    gen = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(333, 16, generator=gen), dim=1).to(device)
    assert symmetric.tile_rows() == 50
    with laic_kernels.use_backend("symmetric"):
        values, indices = laic_kernels.knn_graph(x, 7)
    ref_values, ref_indices = reference.similarity_topk(x, x, 7, exclude_self=True)
    torch.testing.assert_close(values, ref_values, atol=1e-6, rtol=0)
    # Away from near-ties the lists are the reference's, in its order.
    gaps = (ref_values[:, :-1] - ref_values[:, 1:]).min(1).values
    clear = gaps > 1e-5
    assert int(clear.sum()) > 300
    assert torch.equal(indices[clear], ref_indices[clear])
    assert not bool((indices == torch.arange(333, device=device)[:, None]).any())


def four_signs(n: int, d: int, seed: int, device) -> torch.Tensor:
    """Rows of four entries +-1 (norm 2) at random places, the rest 0: their unit rows hold 0 and +-0.5, so the
    cosines (which consistent_neighbours computes from unit rows) are exact too, ties included."""
    gen = torch.Generator().manual_seed(seed)
    places = torch.rand(n, d, generator=gen).argsort(1)[:, :4]
    signs = torch.randint(0, 2, (n, 4), generator=gen).float() * 2 - 1
    return torch.zeros(n, d).scatter_(1, places, signs).to(device)


def test_consistent_neighbours_equals_the_reference(device, tile_chunk):
    image, text = four_signs(61, 7, seed=1, device=device), four_signs(61, 6, seed=2, device=device)
    with laic_kernels.use_backend("symmetric"):
        got = laic_kernels.consistent_neighbours(image, text, 6, return_graphs=True)
    want = reference.consistent_neighbours(unit_rows(image), unit_rows(text), 6, True)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_automatic_mode_takes_it_for_a_set_searched_among_itself():
    x = torch.randn(20, 8)
    assert explain("similarity_topk", x, x, 3, exclude_self=True)["symmetric"] is None
    assert "exclude_self" in explain("similarity_topk", x, x, 3, exclude_self=False)["symmetric"]
    assert "different tensors" in explain("similarity_topk", x, x.clone(), 3, exclude_self=True)["symmetric"]
    assert explain("consistent_neighbours", x, x, 3)["symmetric"] is None


def test_forced_on_an_input_it_cannot_take_says_why():
    x = torch.randn(20, 8)
    with laic_kernels.use_backend("symmetric"), pytest.raises(RuntimeError, match="exclude_self"):
        laic_kernels.similarity_topk(x, x, 3)
    with laic_kernels.use_backend("symmetric"), pytest.raises(RuntimeError, match="different tensors"):
        laic_kernels.similarity_topk(x, x.clone(), 3, exclude_self=True)
    leaf = x.clone().requires_grad_()
    with laic_kernels.use_backend("symmetric"), pytest.raises(RuntimeError, match="requires grad"):
        laic_kernels.similarity_topk(leaf, leaf, 3, exclude_self=True)
    with pytest.raises(ValueError, match="is not a backend"):
        with laic_kernels.use_backend("symetric"):
            pass
