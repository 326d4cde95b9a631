"""The chunked references themselves against direct computations on the full matrix (float64 numpy), with chunks
forced small so that every row lands in some chunk boundary case."""
import importlib
import sys

import numpy as np
import pytest
import torch

from laic_kernels import reference
from laic_kernels import chunks
from laic_kernels.reference.similarity_topk import top_k_lower_index_first


@pytest.fixture(params=[None, 37], ids=["one-chunk", "many-chunks"])
def chunk_elements(request, monkeypatch):
    """With 37, each chunk holds a row or two: the chunk loop and its boundaries are exercised on small inputs."""
    if request.param is not None:
        def small_chunks(n_rows, row_width, max_elements=request.param):
            return chunks.row_chunks(n_rows, row_width, max_elements)

        for module in (sys.modules["laic_kernels.reference.similarity_topk"],
                       sys.modules["laic_kernels.reference.semantic_mix"]):
            monkeypatch.setattr(module, "row_chunks", small_chunks)
    return request.param


@pytest.mark.parametrize("n,m,d,k", [(1, 5, 3, 1), (37, 23, 8, 23), (50, 41, 16, 7)])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_similarity_topk_reference_matches_full_matrix(chunk_elements, n, m, d, k, exclude_self):
    if exclude_self:
        m, k = n, min(k, n - 1)
        if k < 1:
            pytest.skip("a single row has no other key")
    rng = np.random.default_rng(n * 1000 + m)
    q = rng.standard_normal((n, d)).astype(np.float32)
    keys = q if exclude_self else rng.standard_normal((m, d)).astype(np.float32)
    full = q.astype(np.float64) @ keys.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(full, -np.inf)
    expected_idx = np.argsort(-full, axis=1, kind="stable")[:, :k]
    expected_val = np.take_along_axis(full, expected_idx, axis=1)
    values, indices = reference.similarity_topk(torch.from_numpy(q), torch.from_numpy(keys), k,
                                                exclude_self=exclude_self)
    np.testing.assert_allclose(values.numpy(), expected_val, rtol=1e-5, atol=1e-5)
    # Indices may differ only where values tie; the values they point at must be the expected ones.
    np.testing.assert_allclose(np.take_along_axis(full, indices.numpy(), axis=1), expected_val, rtol=1e-5, atol=1e-5)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64


def _softmax_mix(images: np.ndarray, nouns: np.ndarray, tau: float, topk):
    logits = images @ nouns.T / tau
    if topk is not None:
        cut = np.sort(logits, axis=1)[:, -topk][:, None]
        logits = np.where(logits >= cut, logits, -np.inf)
    w = np.exp(logits - logits.max(1, keepdims=True))
    mixed = (w / w.sum(1, keepdims=True)) @ nouns
    return mixed / np.linalg.norm(mixed, axis=1, keepdims=True)


@pytest.mark.parametrize("tau", [0.5, 0.005])
@pytest.mark.parametrize("topk", [None, 1, 5])
def test_semantic_mix_reference_matches_full_softmax(chunk_elements, tau, topk):
    rng = np.random.default_rng(int(tau * 1000) + (topk or 0))
    images = rng.standard_normal((29, 12))
    nouns = rng.standard_normal((17, 12))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    nouns /= np.linalg.norm(nouns, axis=1, keepdims=True)
    out = reference.semantic_mix(torch.tensor(images, dtype=torch.float32), torch.tensor(nouns, dtype=torch.float32),
                                 tau, topk=topk)
    np.testing.assert_allclose(out.numpy(), _softmax_mix(images, nouns, tau, topk), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_similarity_topk_reference_breaks_ties_by_lower_index(exclude_self):
    # Every key appears 3 times: ties everywhere, also at the k-th place (k = 7 cuts a run of three).
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(9, 4, generator=g)[torch.arange(27) % 9]
    queries = keys if exclude_self else torch.randn(11, 4, generator=g)
    values, indices = reference.similarity_topk(queries, keys, 7, exclude_self=exclude_self)
    sims = (queries.double() @ keys.double().t()).numpy()
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    for row in range(len(queries)):
        expected = np.lexsort((np.arange(27), -np.round(sims[row], 5)))[:7]
        assert indices[row].tolist() == expected.tolist()
        np.testing.assert_allclose(values[row].numpy(), sims[row][expected], rtol=0, atol=1e-5)


def test_rows_that_all_tie_need_no_more_memory_than_rows_that_do_not():
    # Each image given twice: its copies tie at the k-th place of every row near them, and every row took the
    # full-width path over the whole tile at once (5x the tile's documented memory).
    from laic.profiling import FitProfiler, step

    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(2048, 4096, generator=g)
    tied = distinct.clone()
    tied[:, 1::2] = tied[:, 0::2]          # every value twice in a row: the k-th and (k+1)-th tie
    peaks = {}
    for name, sims in (("distinct", distinct), ("tied", tied)):
        profiler = FitProfiler(torch.device("cpu"))
        with profiler.recording(), step(name, "graphs"):
            top_k_lower_index_first(sims, 11)
        peaks[name] = profiler.steps[0]["peak_extra_bytes"]
    tile = distinct.numel() * 4
    assert peaks["tied"] <= max(2 * peaks["distinct"], tile // 4), (peaks, tile)


@pytest.mark.parametrize("block_rows", [None, 1, 7])    # the tied rows in one block, one by one, in blocks of 7
@pytest.mark.parametrize("k", [1, 4, 9])
def test_top_k_lower_index_first_mixes_tied_and_untied_rows(k, block_rows, monkeypatch):
    # Small integer values: some rows tie across the k-th place (the full-width path), others only inside their
    # top k or not at all (the k+1-candidate path); every row must equal a lexsort of (-value, index).
    g = torch.Generator().manual_seed(k)
    if block_rows is not None:   # (the module: laic_kernels.reference's similarity_topk is its function)
        module = importlib.import_module("laic_kernels.reference.similarity_topk")
        monkeypatch.setattr(module, "FULL_WIDTH_BLOCK_ELEMENTS", 9 * block_rows)
    sims = torch.randint(-4, 5, (60, 9), generator=g).float()
    sims[::3] = torch.randn(20, 9, generator=g)          # untied rows among them
    sims[1, :4] = float("-inf")                            # excluded entries (as exclude_self writes them)
    values, indices = top_k_lower_index_first(sims, k)
    for row in range(len(sims)):
        expected = np.lexsort((np.arange(9), -sims[row].numpy()))[:k]
        assert indices[row].tolist() == expected.tolist()
        assert values[row].tolist() == sims[row, expected].tolist()
