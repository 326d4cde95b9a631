"""laic_kernels.triton.tuning: a kernel's tile plan picked by timing the candidates once per kind of problem, and the
kernels that use it giving the reference's answer whichever plan is picked."""
import pytest
import torch

pytest.importorskip(
    "triton", reason="Triton is not installed (a CPU-only torch does not bring it); its kernels' tests need it")

import laic_kernels
from laic_kernels import reference
from laic_kernels.triton import consistent_neighbours as neighbours_kernel
from laic_kernels.triton import similarity_topk as topk_kernel
from laic_kernels.triton import tuning


@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(tuning, "_CHOSEN", {})


def test_fastest_times_each_candidate_once_and_remembers(monkeypatch, fresh_choices):
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def fake_milliseconds(run, candidate):
        timed.append(candidate)
        return times[candidate]

    monkeypatch.setattr(tuning, "milliseconds", fake_milliseconds)
    assert tuning.fastest("kind", ["a", "b", "c"], run=None) == "b"
    assert tuning.fastest("kind", ["a", "b", "c"], run=None) == "b"
    assert timed == ["a", "b", "c"]                     # the second call read the remembered choice
    times["a"] = 0.5
    assert tuning.fastest("other kind", ["a", "b", "c"], run=None) == "a"
    assert tuning.chosen() == {"kind": "b", "other kind": "a"}
    assert tuning.fastest("single", ["only"], run=None) == "only" and "single" not in tuning.chosen()


def test_only_large_cuda_problems_are_tuned():
    assert not tuning.worth_tuning(torch.device("cpu"), 1 << 60)
    cuda = torch.device("cuda")     # only its type is read: no GPU needed
    assert tuning.worth_tuning(cuda, tuning.TUNE_MIN_MACS)
    assert not tuning.worth_tuning(cuda, tuning.TUNE_MIN_MACS - 1)


def test_off_cuda_the_default_plan_runs_untimed(monkeypatch, fresh_choices):
    def refuse(*args):
        raise AssertionError("timed a plan off CUDA")

    monkeypatch.setattr(tuning, "milliseconds", refuse)
    monkeypatch.setattr(tuning, "TUNE_MIN_MACS", 0)
    x = torch.randn(40, 16)
    assert topk_kernel.tuned_plan(x, x, 5, True) == topk_kernel.plans(5)[0]
    assert neighbours_kernel.tuned_plan(x, x, 5, True) == neighbours_kernel.plans(5)[0]
    assert tuning.chosen() == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run the Triton kernels under the interpreter only "
                    "where no GPU is seen (tests/conftest.py)")
def test_the_probe_path_on_the_cpu(monkeypatch, fresh_choices):
    """What a large CUDA call does, run here: the probe is the first PROBE_ROWS x PROBE_KEYS of the inputs, each plan
    runs on it (a fake clock ranks them: the last plan wins), the kind names the probe's shape, and the call then
    runs with the chosen plan and gives the reference's answer."""
    monkeypatch.setattr(tuning, "worth_tuning", lambda device, macs: True)
    monkeypatch.setattr(tuning, "PROBE_ROWS", 50)
    monkeypatch.setattr(tuning, "PROBE_KEYS", 70)
    probed = []

    def fake_milliseconds(run, plan):
        run(plan)                                   # the probe call itself, on the interpreter
        probed.append(plan)
        return -len(probed)                         # each plan "faster" than the one before

    monkeypatch.setattr(tuning, "milliseconds", fake_milliseconds)
    gen = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(90, 16, generator=gen), torch.randn(150, 16, generator=gen)
    with laic_kernels.use_backend("triton"):
        values, indices = laic_kernels.similarity_topk(queries, keys, 5)
        kept, mask = laic_kernels.consistent_neighbours(queries, keys[:90], 5)
    assert probed == list(topk_kernel.plans(5)) + list(neighbours_kernel.plans(5))
    assert tuning.chosen() == {
        ("similarity_topk", queries.device, torch.float32, 16, 5, False, 50, 70): topk_kernel.plans(5)[-1],
        ("consistent_neighbours", queries.device, torch.float32, 16, 16, 5, False, 50): neighbours_kernel.plans(5)[-1]}
    expected_values, expected_indices = reference.similarity_topk(queries, keys, 5)
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(indices, expected_indices)
    with laic_kernels.use_backend("reference"):
        expected = laic_kernels.consistent_neighbours(queries, keys[:90], 5)
    assert torch.equal(kept, expected[0]) and torch.equal(mask, expected[1])


def test_a_failing_candidate_is_never_picked(monkeypatch, fresh_choices):
    """A plan that cannot run on this device (e.g. too much shared memory) rules itself out; the others are timed."""
    def run(plan):
        if plan == "too big":
            raise RuntimeError("out of resources")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    assert tuning.milliseconds(run, "too big") == float("inf")
    assert tuning.fastest("kind", ["too big", "fits"], run) == "fits"
    # When nothing runs (e.g. the probe itself out of memory), the default is taken and nothing is remembered.
    assert tuning.fastest("other kind", ["too big", "too big"], run) == "too big"
    assert tuning.chosen() == {"kind": "fits"}


def test_nothing_is_timed_while_a_cuda_graph_is_captured(monkeypatch, fresh_choices):
    monkeypatch.setattr(tuning, "capturing", lambda: True)
    monkeypatch.setattr(tuning, "milliseconds", lambda run, plan: pytest.fail("timed during capture"))
    assert tuning.fastest("new kind", ["default", "other"], run=None) == "default"
    assert tuning.chosen() == {}
    tuning._CHOSEN["known kind"] = "other"             # chosen before the capture: the captured call uses it too
    assert tuning.fastest("known kind", ["default", "other"], run=None) == "other"


class FakeEvent:
    """torch.cuda.Event stand-in for timing on the CPU: a clock read at record()."""

    def __init__(self, enable_timing=False):
        self.at = None

    def record(self):
        import time
        self.at = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning times plans on a CUDA device")
def test_tuned_kernels_match_the_reference_cuda(monkeypatch, fresh_choices):
    """Every problem tuned (threshold 0, a probe smaller than the input): the plans are timed on the device, one is
    remembered per kind, and the answers are the reference's."""
    monkeypatch.setattr(tuning, "TUNE_MIN_MACS", 0)
    monkeypatch.setattr(tuning, "PROBE_ROWS", 300)
    monkeypatch.setattr(tuning, "PROBE_KEYS", 200)
    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(1000, 64, generator=gen), dim=1).cuda().bfloat16()
    keys = torch.nn.functional.normalize(torch.randn(700, 64, generator=gen), dim=1).cuda().bfloat16()
    text = queries.flip(1)
    with laic_kernels.use_backend("triton"):
        values, indices = laic_kernels.similarity_topk(queries, keys, 10)
        graph_values, graph = laic_kernels.knn_graph(queries, 10)
        kept, mask, image_graph, text_graph = laic_kernels.consistent_neighbours(queries, text, 10, return_graphs=True)
    kinds = sorted(kind[0] for kind in tuning.chosen())
    assert kinds == ["consistent_neighbours", "similarity_topk", "similarity_topk"]
    assert_topk(queries, keys, values, indices)
    assert_topk(queries, queries, graph_values, graph, exclude_self=True)
    for features, lists in ((queries, image_graph), (text, text_graph)):
        assert_topk(features, features, similarities(features, features, lists), lists, exclude_self=True)
    assert torch.equal(image_graph, graph)
    expected = laic_kernels.consistent_neighbours(image_graph, text_graph)    # the filter alone, on these lists
    assert torch.equal(kept, expected[0]) and torch.equal(mask, expected[1])


def similarities(queries, keys, indices):
    return (queries.double()[:, None, :] * keys.double()[indices]).sum(-1).float()


def assert_topk(queries, keys, values, indices, exclude_self=False):
    """Values are the products at those indices, and at every rank the reference's value (bf16 near-ties may pick
    another index of the same value)."""
    torch.testing.assert_close(values, similarities(queries, keys, indices), atol=1e-4, rtol=0)
    expected = reference.similarity_topk(queries.float(), keys.float(), values.shape[1], exclude_self=exclude_self)[0]
    torch.testing.assert_close(values, expected, atol=1e-4, rtol=0)
    if exclude_self:
        assert not bool((indices == torch.arange(len(indices), device=indices.device)[:, None]).any())
