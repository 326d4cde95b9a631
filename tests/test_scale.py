"""Scale properties of the fit: no host syncs per Lloyd iteration, memory linear in N (no [N, k, D] gathers), the
profiling hook, and the operand dtype choice."""
import contextlib
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

import laic.kmeans as kmeans
import laic.operands as operands
import laic.profiling as profiling
import laic.stage0 as stage0
from laic import LAIC
from laic.distributed.rows import RowBlocks
from laic.metrics import adjusted_rand_index
from laic.profiling import FitProfiler, step, table
from laic_kernels import checks
from laic_kernels import chunks

from host_reads import SYNCS



def blobs(n, k, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.randint(k, (n,), generator=g)
    return F.normalize(centres[labels] + spread * torch.randn(n, dim, generator=g), dim=1)


@contextlib.contextmanager
def counting_syncs():
    """Count the Tensor methods that read values back to the host (a device sync on CUDA) in stage 0's own code: not
    inside ``similarity_topk``, whose CPU reference may read (on CUDA it is one Triton kernel)."""
    counts = {name: 0 for name in SYNCS}
    inside_kernel = [False]
    patch = pytest.MonkeyPatch()

    def counted(name, original):
        def wrapper(self, *args, **kwargs):
            counts[name] += not inside_kernel[0]
            return original(self, *args, **kwargs)
        return wrapper

    def kernel(*args, _op=operands.similarity_topk, **kwargs):
        inside_kernel[0] = True
        try:
            return _op(*args, **kwargs)
        finally:
            inside_kernel[0] = False

    for name in SYNCS:
        patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    patch.setattr(operands, "similarity_topk", kernel)
    try:
        yield counts
    finally:
        patch.undo()


def test_lloyd_reads_the_device_once_per_check_not_per_iteration(monkeypatch):
    # The GPU's schedule (on the CPU, where reading is free, Lloyd checks every iteration instead).
    monkeypatch.setattr(kmeans, "lloyd_check_every", lambda device: kmeans.LLOYD_CHECK_EVERY)
    # Overlapping blobs and many clusters: Lloyd needs many iterations to settle.
    x = blobs(600, 12, 8, 0.9, seed=1)
    start = x[torch.randperm(600, generator=torch.Generator().manual_seed(0))[:40]].clone()
    start[0] = -start[1]            # a centre far from most rows: it may empty, and is then re-seeded on device
    rows = RowBlocks(600)
    with checks.values_checked(), counting_syncs() as counts:
        labels, centres, objective, n_iter = kmeans._lloyd(x, start, 200, rows)
    total = sum(counts.values())
    assert n_iter >= 3 * kmeans.LLOYD_CHECK_EVERY, "the case must take many iterations to mean anything"
    # One flag per check, and after the loop the iteration count and the objective.
    assert total <= n_iter // kmeans.LLOYD_CHECK_EVERY + 1 + 2, counts
    assert total < n_iter / 2
    # Stopping late changes nothing: the result is a fixed point, the same as stopping at convergence.
    monkeypatch.setattr(kmeans, "lloyd_check_every", lambda device: 1)
    again = kmeans._lloyd(x, start, n_iter, rows)
    assert torch.equal(again[0], labels) and torch.equal(again[1], centres) and again[3] == n_iter
    sims = x @ centres.t()
    assert torch.equal(sims.argmax(1), labels)


@pytest.mark.parametrize("with_gram", [False, True])
def test_kmeans_pp_seeding_reads_nothing_back_per_step(with_gram):
    # k steps of a restart, each a read or more before (a multinomial on the host): none now, with or without the
    # Gram matrix's row lookups.
    x = blobs(400, 8, 6, 0.5, seed=4)
    gram = x @ x.t() if with_gram else None
    with counting_syncs() as counts:
        seeds = kmeans._kmeans_pp(x, 30, torch.Generator().manual_seed(0), greedy=True, gram=gram)[0]
    assert sum(counts.values()) == 0, counts
    assert seeds.shape == (30, 6)
    # Seeds are rows of x, all distinct where x has that many distinct rows (a chosen row has distance 0: never
    # drawn again).
    matches = (seeds @ x.t() > 1 - 1e-6).nonzero()[:, 1]
    assert len(set(matches.tolist())) == 30


def test_lloyd_with_every_check_equals_the_plain_loop(monkeypatch):
    # Checking every iteration (the plain loop, the CPU's) and every LLOYD_CHECK_EVERY iterations (the GPU's) give
    # the same result.
    x = blobs(300, 6, 8, 0.6, seed=2)
    start = x[:6].clone()
    plain = kmeans._lloyd(x, start, 100, RowBlocks(300))
    monkeypatch.setattr(kmeans, "lloyd_check_every", lambda device: 5)
    late = kmeans._lloyd(x, start, 100, RowBlocks(300))
    assert torch.equal(late[0], plain[0]) and torch.equal(late[1], plain[1]) and late[3] == plain[3]
    assert late[2] == pytest.approx(plain[2], rel=1e-6)


def test_lloyd_reseeds_an_empty_cluster_without_reading_it():
    # Two clusters of points on +e0 / +e1 and a third centre on -e0 that no point is nearest to.
    x = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0], [0.7, 0.7]]), dim=1)
    start = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels, centres, _, _ = kmeans._lloyd(x, start, 10, RowBlocks(5))
    assert sorted(torch.bincount(labels, minlength=3).tolist()) == [1, 2, 2]
    assert torch.allclose(centres.norm(dim=1), torch.ones(3))


def small_chunks(monkeypatch):
    """Chunk constants small enough that any term growing with N shows at test sizes."""
    for module in (stage0, kmeans, operands):   # every streamed pass: operands, Lloyd, neighbour means
        monkeypatch.setattr(module, "BLOCK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(chunks, "MAX_CHUNK_ELEMENTS", 1 << 18)   # 1 MB: the references' chunks, the graphs' tiles


# The bound written in LAIC's docstring, in units of N x D float32 (D = 64 here), plus the N x k neighbour lists,
# the N x K terms of stage 1 and a constant for the chunks and the heads.
FIT_ND_FLOATS = 12


@pytest.mark.parametrize("k", [10, 100])   # K = 100: k-means++ reads a Gram matrix (it was N x N up to N = 8192)
def test_fit_peak_memory_is_linear_in_n(monkeypatch, k):
    small_chunks(monkeypatch)
    dim, n_neighbours = 64, 10
    nouns = F.normalize(torch.randn(300, dim, generator=torch.Generator().manual_seed(5)), dim=1)
    peaks = {}
    for n in (2000, 4000):
        model = LAIC(n_clusters=k, profile=True, stage1_steps=10, n_neighbours=n_neighbours)
        model.fit(blobs(n, k, dim, 0.3, seed=3), nouns)
        profile = model.profile_
        nd = n * dim * 4
        bound = FIT_ND_FLOATS * nd + 4 * n * n_neighbours * 8 + 4 * n * k * 4 + (8 << 20)
        assert 0 < profile["peak_extra_bytes"] <= bound, table(profile)
        by_name = {s["name"]: s["peak_extra_bytes"] for s in profile["steps"]}
        # The fused space is [N, 2D]; gathering every row's neighbours at once would add N x k x D.
        assert by_name["fused features"] <= 2.5 * nd, table(profile)
        peaks[n] = profile["peak_extra_bytes"]
    assert peaks[4000] <= 2.2 * peaks[2000]


def test_profile_records_every_step_and_writes_a_trace(tmp_path, device):
    # On CUDA torch.profiler also records CUDA activity, around stage 1's CUDA-graph capture (on by default).
    x = blobs(300, 3, 16, 0.3, seed=0)
    nouns = F.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    model = LAIC(n_clusters=3, profile=True, stage1_steps=5, device=str(device)).fit(x, nouns)
    kinds = {s["kind"] for s in model.profile_["steps"]}
    assert {"k-means", "counterparts", "graphs", "stage-1"} <= kinds
    assert all(s["seconds"] >= 0 and s["peak_extra_bytes"] >= 0 for s in model.profile_["steps"])
    assert model.profile_["seconds"] >= sum(s["seconds"] for s in model.profile_["steps"]) * 0.99
    assert sorted(profiling.write(tmp_path, model)) == ["profile.json", "trace.json"]
    assert (tmp_path / "trace.json").stat().st_size > 0
    plain = LAIC(n_clusters=3, stage1_steps=5, device=str(device)).fit(x, nouns)
    assert not hasattr(plain, "profile_")
    if device.type == "cpu":
        assert (plain.labels_ == model.labels_).all()
    else:   # (a GPU's reductions need not repeat to the bit)
        assert adjusted_rand_index(plain.labels_, model.labels_) > 0.95


def test_profile_without_a_trace_writes_the_profile_alone(tmp_path):
    """What a recording without torch.profiler (CUDA with trace=False, e.g. fit_images) leaves: profile.json only."""
    import json
    import types

    profiler = FitProfiler(torch.device("cpu"))   # never recording: no trace, as on CUDA with trace=False
    model = types.SimpleNamespace(profile_={"steps": [], "seconds": 1.0}, profiler_=profiler)
    assert not profiler.has_trace
    assert profiling.write(tmp_path, model) == ["profile.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]
    assert json.loads((tmp_path / "profile.json").read_text()) == model.profile_
    # A folder not there yet is made (open() failed); the arguments the wrong way round are said to be.
    assert profiling.write(tmp_path / "new" / "run", model) == ["profile.json"]
    assert json.loads((tmp_path / "new" / "run" / "profile.json").read_text()) == model.profile_
    with pytest.raises(TypeError, match=r"folder must be a path, got SimpleNamespace \(the arguments the other way"):
        profiling.write(model, tmp_path)
    with pytest.raises(ValueError, match="no trace recorded"):
        profiler.export_trace(tmp_path / "trace.json")


def test_profiler_measures_a_known_allocation():
    profiler = FitProfiler(torch.device("cpu"))
    with profiler.recording():
        with step("allocate", "other"):
            held = torch.ones(1 << 20)           # 4 MiB
            del held
            torch.zeros(1 << 19).sum()           # 2 MiB, freed
    (record,) = profiler.steps
    assert record["peak_extra_bytes"] == 4 << 20


class FakeCudaMemory:
    """torch.cuda's memory counters, driven by hand: allocations and frees in bytes, peaks reset as torch resets."""

    def __init__(self, allocated):
        self.allocated = self.peak = self.reserved = self.peak_reserved = allocated

    def hold(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)
        self.reserved = max(self.reserved, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def reset(self, device=None):
        self.peak, self.peak_reserved = self.allocated, self.reserved

    def install(self, monkeypatch):
        for name, fn in (("synchronize", lambda device=None: None),
                         ("memory_allocated", lambda device=None: self.allocated),
                         ("max_memory_allocated", lambda device=None: self.peak),
                         ("max_memory_reserved", lambda device=None: self.peak_reserved),
                         ("reset_peak_memory_stats", self.reset)):
            monkeypatch.setattr(torch.cuda, name, fn)


def test_each_rank_of_scale_py_writes_a_trace_of_its_own(monkeypatch, tmp_path):
    # Named by the rank's own rows: ranks of equal shares wrote one file, a rank at N = 2n over the one-process
    # trace at n.
    import types

    from laic.distributed.world import World

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale

    args = scale.parse_args(["--sizes", "40", "--k", "2", "--dim", "4", "--nouns", "4", "--warmup", "0",
                             "--threads", "1", "--nproc", "2", "--trace-dir", str(tmp_path)])
    monkeypatch.setattr(scale, "fit", lambda *a: types.SimpleNamespace(history_={}))
    for rank in (0, 1):
        monkeypatch.setattr(scale.distributed, "current", lambda: World(rank=rank, size=2))
        assert scale.rank_fit(40, args, torch.device("cpu"))["rows"] == 20
    scale.one_fit(*[torch.zeros(20, 4)] * 2, args, torch.device("cpu"), None)     # one process at N = 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace-n20-auto.json", "trace-n40-rank0of2-auto.json",
                                                          "trace-n40-rank1of2-auto.json"]


def test_cuda_steps_nested_keep_their_own_peaks_and_a_second_recording_starts_afresh(monkeypatch):
    # A nested step reset the counters, and the outer step lost its peak before it (10 GiB read as 1); a second
    # recording listed the first one's steps beside its own.
    memory = FakeCudaMemory(0)
    memory.install(monkeypatch)
    profiler = FitProfiler(torch.device("cuda"), trace=False)
    for _ in range(2):
        with profiler.recording():
            with step("outer", "other"):
                memory.hold(10 << 30)
                memory.hold(-(10 << 30))
                with step("inner", "other"):
                    memory.hold(1 << 30)
                    memory.hold(-(1 << 30))
                memory.hold(2 << 30)
                memory.hold(-(2 << 30))
        summary = profiler.summary()
        assert [(s["name"], s["peak_extra_bytes"]) for s in summary["steps"]] == [("inner", 1 << 30),
                                                                                 ("outer", 10 << 30)]
        assert summary["peak_extra_bytes"] == 10 << 30


def test_cpu_profiler_records_twice(monkeypatch):
    profiler = FitProfiler(torch.device("cpu"))
    for size in (1 << 20, 1 << 22):
        with profiler.recording():
            with step("a", "other"):
                x = torch.ones(size // 4)
                del x
        steps = profiler.summary()["steps"]      # (an IndexError in the second recording before)
        assert [s["name"] for s in steps] == ["a"] and steps[0]["peak_extra_bytes"] >= size


def test_cuda_profile_keeps_the_whole_fits_peak_though_each_step_resets_the_counters(monkeypatch):
    # scale.py's "device memory at most" read torch's counters after the fit: each step resets them, so it gave the
    # last step's peak (6 GiB where the fit reached 35, against the 40 GB target).
    memory = FakeCudaMemory(5 << 30)          # the inputs, on the device before the fit
    memory.install(monkeypatch)
    profiler = FitProfiler(torch.device("cuda"), trace=False)
    with profiler.recording():
        with step("large", "other"):
            memory.hold(30 << 30)
            memory.hold(-(30 << 30))
        with step("small", "other"):
            memory.hold(1 << 30)
            memory.hold(-(1 << 30))
    summary = profiler.summary()
    assert summary["base_bytes"] == 5 << 30 and summary["peak_extra_bytes"] == 30 << 30
    assert summary["peak_reserved_bytes"] == 35 << 30
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale

    assert "device memory at most 35.0 GiB (37.6 GB) allocated, 35.0 GiB (37.6 GB) reserved" in \
        scale.absolute_peaks(summary)


def test_profiler_reports_each_step_as_it_ends():
    """on_step sees every step's record once, in order, when it ends (scale.py prints a long fit's progress so)."""
    seen = []
    profiler = FitProfiler(torch.device("cpu"),
                           on_step=lambda record: seen.append((record["name"], len(profiler.steps))))
    with profiler.recording():
        with step("first", "other"):
            assert seen == []
        with step("second", "k-means"):
            assert seen == [("first", 1)]
    assert seen == [("first", 1), ("second", 2)]
    assert [s["name"] for s in profiler.steps] == ["first", "second"]


def test_operand_dtype_by_device(monkeypatch):
    assert operands.operand_dtype(torch.device("cpu")) == torch.float32
    with operands.half_operands():
        assert operands.operand_dtype(torch.device("cpu")) == torch.bfloat16
        assert operands.unit_operands(torch.randn(5, 3)).dtype == torch.bfloat16
    assert operands.operand_dtype(torch.device("cpu")) == torch.float32
    for capability, dtype in (((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert operands.operand_dtype(torch.device("cuda")) == dtype


def test_half_operands_fit_on_cpu_matches_float32():
    # The half-precision path end to end (reference kernels on bf16 operands): float32 outputs, same clusters.
    x = blobs(400, 4, 32, 0.3, seed=6)
    nouns = F.normalize(torch.randn(60, 32, generator=torch.Generator().manual_seed(2)), dim=1)
    full = LAIC(n_clusters=4, stage1_steps=0).fit(x, nouns)
    with operands.half_operands():
        half = LAIC(n_clusters=4, stage1_steps=0).fit(x, nouns)
    assert half.centres_.dtype == torch.float32 and half.nouns_.dtype == torch.float32
    from sklearn.metrics import adjusted_rand_score
    assert len(set(full.labels_.tolist())) == 4
    assert adjusted_rand_score(full.labels_, half.labels_) > 0.95


TRITON_OPS = ("similarity_topk", "semantic_mix", "consistent_neighbours", "consistency_loss")


@pytest.mark.parametrize("operands_dtype", [None, torch.bfloat16])
def test_a_fit_through_the_triton_kernels_is_the_fit_through_the_cpu_backends(operands_dtype, monkeypatch):
    """The pipeline's own calls of every Triton kernel (stage 0's searches, mixtures and filtered graphs, stage 1's
    losses), run by the interpreter on the CPU, as a GPU fit would run them but for the CPU's branches; and with
    bfloat16 operands, as a GPU fit hands them over. Against the same fit on the CPU's backends: the same labels,
    probabilities within 0.02. Not within rounding: the text counterparts (softmax mixtures at tau 0.005) are many
    near-copies, whose order in the text kNN graph turns on the last bit of the mixture, which the two backends
    round apart; a few consistent neighbours differ (4 of 750 on an AVX2-only AMD EPYC, 12-07: 0.008 apart in
    probability, where another CPU happened to give 1e-6). (The kernel tests take each op alone, on inputs of their
    own making, to rounding.)"""
    import importlib

    import laic_kernels.backends as backends
    if not backends.triton_interpreting() or backends.triton_import_error():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1, as conftest sets without a GPU)")
    from laic.demo_data import make_semantic_dataset
    data = make_semantic_dataset(n_classes=4, n_per_class=25, dim=32, seed=0)   # nouns that describe the images
    x, nouns = data.features, data.noun_features
    options = dict(n_clusters=4, random_state=0, n_threads=1, stage1_steps=20)
    dtype_block = (lambda: operands.half_operands(operands_dtype)) if operands_dtype else contextlib.nullcontext
    with dtype_block():
        plain = LAIC(**options).fit(x, nouns)
    calls = {op: 0 for op in TRITON_OPS}
    for op in TRITON_OPS:
        module = importlib.import_module(f"laic_kernels.triton.{op}")

        def counted(*args, _launch=getattr(module, op), _op=op, **kwargs):
            calls[_op] += 1
            return _launch(*args, **kwargs)
        monkeypatch.setattr(module, op, counted)
    chosen_on_cpu = backends.triton_why_not
    monkeypatch.setattr(backends, "triton_why_not", lambda device, forced: chosen_on_cpu(device, True))
    with dtype_block():
        triton = LAIC(**options).fit(x, nouns)
    assert all(calls.values()), calls   # each kernel ran, in automatic selection
    assert len(set(plain.labels_.tolist())) == 4
    assert (triton.labels_ == plain.labels_).all()
    torch.testing.assert_close(torch.from_numpy(triton.predict_proba(x)), torch.from_numpy(plain.predict_proba(x)),
                               rtol=0, atol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_uses_half_operands_and_float32_outputs():
    x = blobs(2000, 5, 64, 0.3, seed=7).cuda()
    nouns = F.normalize(torch.randn(200, 64, generator=torch.Generator().manual_seed(3)), dim=1).cuda()
    assert operands.operand_dtype(x.device) in (torch.bfloat16, torch.float16)
    model = LAIC(n_clusters=5, device="cuda", stage1_steps=0).fit(x, nouns)
    cpu = LAIC(n_clusters=5, stage1_steps=0).fit(x.cpu(), nouns.cpu())
    assert model.centres_.dtype == torch.float32 and model.centres_.device.type == "cuda"
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(cpu.labels_, model.labels_) > 0.9


def test_laic_fit_shows_each_step_as_it_ends_unless_quiet(tmp_path, capsys):
    """The progress lines on stderr name the steps the profile records, in its order, with their times."""
    import json
    import logging
    import re
    import sys

    from laic.cli import main
    from laic.commands.demo import save_data
    from laic.demo_data import make_semantic_dataset
    save_data(make_semantic_dataset(n_classes=3, n_per_class=20, dim=32, seed=0), tmp_path)
    logger = logging.getLogger("laic")
    handlers, level = list(logger.handlers), logger.level
    args = ["fit", "--features", str(tmp_path / "features.npy"), "--vocab", str(tmp_path / "vocab"), "--k", "3",
            "--device", "cpu", "--threads", "1"]
    # With a handler on the root logger too (a library's logging.info() makes one): each line still once.
    root = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(root)
    try:
        assert main(args + ["--out", str(tmp_path / "run"), "--profile"]) == 0
    finally:
        logging.getLogger().removeHandler(root)
    lines = [line for line in capsys.readouterr().err.splitlines() if re.search(r": \d+\.\d s$", line)]
    shown = [re.fullmatch(r"laic fit: (.+): (\d+\.\d) s", line) for line in lines]
    assert all(shown), lines   # none of them again through the root logger's handler
    steps = json.loads((tmp_path / "run" / "profile.json").read_text())["steps"]
    assert [m.group(1) for m in shown] == [s["name"] for s in steps]
    for m, s in zip(shown, steps):   # the step's own wall time, beside the profiler's
        assert abs(float(m.group(2)) - s["seconds"]) <= 0.1 + 0.1 * s["seconds"], (m.group(0), s)
    assert logger.handlers == handlers and logger.level == level and logger.propagate   # gone with the command
    assert main(args + ["--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert not re.search(r": \d+\.\d s$", capsys.readouterr().err, re.M)


def test_a_step_logs_its_end_only_where_shown_and_only_when_it_ends(caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="laic.progress")   # whatever pytest's --log-level says
    with profiling.step("unseen", "other"):    # INFO not enabled: nothing formatted or synchronised
        pass
    caplog.set_level(logging.INFO, logger="laic.progress")
    with profiling.named_part("K search: "), profiling.step("graphs", "graphs"):
        pass
    with profiling.step("own line", "stage-2", announce=False):
        pass
    with pytest.raises(KeyError), profiling.step("failed", "other"):
        raise KeyError("x")
    assert [r.getMessage().rsplit(": ", 1)[0] for r in caplog.records] == ["K search: graphs"]


def test_a_shown_step_waits_for_the_fits_own_gpu(caplog, monkeypatch):
    """Its time is its kernels': the step waits for the device the fit runs on (cuda:1 is not the current device),
    before and after, and only where its end is shown."""
    import logging


    class FitOnSecondGpu:
        profile = False

        def torch_device(self):
            return torch.device("cuda", 1)

    waited = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    caplog.set_level(logging.WARNING, logger="laic.progress")
    with profiling.fit_recording(FitOnSecondGpu()), profiling.step("unshown", "other"):
        pass
    assert waited == []
    caplog.set_level(logging.INFO, logger="laic.progress")
    with profiling.fit_recording(FitOnSecondGpu()), profiling.step("graphs", "graphs"):
        pass
    assert waited == [torch.device("cuda", 1)] * 2
    with profiling.step("outside a fit", "other"):
        pass
    assert waited[2:] == [torch.device("cuda")] * 2
    # The clock starts once the work queued before the step is done, and stops once the step's own is.
    order = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: order.append("wait"))
    clock = profiling.time.perf_counter
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: order.append("clock") or clock())
    with profiling.fit_recording(FitOnSecondGpu()), profiling.step("graphs", "graphs"):
        pass
    assert order == ["wait", "clock", "wait", "clock"]


@pytest.mark.parametrize("environment, shown", [({}, True), ({"RANK": "1"}, True),   # a stray RANK alone
                                                ({"RANK": "0", "WORLD_SIZE": "2"}, True),
                                                ({"RANK": "1", "WORLD_SIZE": "2"}, False)])
def test_progress_is_shown_by_torchruns_first_process_only(environment, shown, monkeypatch, caplog):
    import argparse
    import logging

    from laic import cli
    caplog.set_level(logging.WARNING, logger="laic")   # whatever pytest's --log-level says

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    args = argparse.Namespace(_module=argparse.Namespace(PROGRESS=True), command="fit", quiet=False)
    with cli._progress_shown(args):
        assert logging.getLogger("laic.progress").isEnabledFor(logging.INFO) == shown


@pytest.mark.parametrize("terminal", [True, False, "notebook"])
def test_a_bar_written_to_a_log_file_updates_once_a_minute(terminal, monkeypatch):
    """A bar redrawn every 0.1 s (tqdm's default) fills a batch job's log: 36,000 updates an hour there. A
    notebook's stderr is no terminal either, but it shows the bar live."""
    import io
    import types

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    if terminal == "notebook":
        monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))

    class Stderr(io.StringIO):
        def isatty(self):
            return terminal is True

    stderr = Stderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    clock = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])
    with profiling.progress_bar(1000, True, "img", "embedding images") as bar:
        for _ in range(1000):   # an update every 0.5 s for 500 s
            clock[0] += 0.5
            bar.update(1)
    redrawn = stderr.getvalue().count("\r")
    assert (redrawn > 900) if terminal else (redrawn < 15), redrawn   # (a notebook: tqdm.auto draws text here)


@pytest.mark.parametrize("stderr", ["closed", "broken pipe", "full", "none"])
def test_a_progress_bar_on_a_dead_stderr_goes_quiet(stderr, monkeypatch):
    # `laic report ... 2>&-` (sys.stderr None), `2>&1 | head -c 0` (a broken pipe), `2>/dev/full`: the bar's write
    # raised, and the command failed (status 1) without a word, its report or cache not written.
    import errno
    import io
    import sys

    class Dead(io.StringIO):
        def write(self, text):
            if stderr == "closed":
                raise ValueError("I/O operation on closed file")
            raise OSError(errno.EPIPE if stderr == "broken pipe" else errno.ENOSPC, "dead")

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", None if stderr == "none" else Dead())
    with profiling.progress_bar(50, True, "img", "embedding images") as bar:
        for _ in range(50):
            bar.update(1)
    assert bar.disable if stderr == "none" else bar.n == 50   # (no stream at all: no bar)


def test_laic_fit_profile_writes_profile_and_trace(tmp_path, capsys):
    import json

    import numpy as np

    from laic.cli import main
    from laic.commands.demo import save_data
    from laic.demo_data import make_semantic_dataset
    save_data(make_semantic_dataset(n_classes=3, n_per_class=20, dim=32, seed=0), tmp_path)
    out = tmp_path / "run"
    args = ["fit", "--features", str(tmp_path / "features.npy"), "--vocab", str(tmp_path / "vocab"), "--k", "3",
            "--out", str(out), "--device", "cpu", "--threads", "1", "--profile"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    profile = json.loads((out / "profile.json").read_text())
    assert [s["name"] for s in profile["steps"]][-2:] == ["fused k-means", "stage 1 (heads)"]
    assert "fused k-means" in printed and (out / "trace.json").stat().st_size > 0
    labels = np.load(out / "labels.npy")
    assert main(args + ["--overwrite"]) == 0      # a profiled run is a run: --overwrite replaces it
    np.testing.assert_array_equal(np.load(out / "labels.npy"), labels)


def test_scale_rows_name_the_backend_the_fit_ran_under(monkeypatch, tmp_path, capsys):
    # LAIC_KERNELS_BACKEND labelled the rows while one_fit's use_backend(None) forced automatic selection over it.
    import types

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale
    from laic_kernels import forced_backend

    ran = []
    monkeypatch.setattr(scale, "fit", lambda *a: ran.append(forced_backend()) or types.SimpleNamespace(history_={}))
    argv = ["--sizes", "16", "--k", "2", "--dim", "4", "--nouns", "4", "--warmup", "0", "--threads", "1",
            "--trace-dir", str(tmp_path)]
    for env, reference, expected in (("reference", False, ["reference"]), ("", True, [None, "reference"]),
                                     ("symmetric", True, ["symmetric", "reference"])):
        ran.clear()
        for trace in tmp_path.iterdir():
            trace.unlink()
        monkeypatch.setenv("LAIC_KERNELS_BACKEND", env)
        assert scale.main(argv + ["--reference"] * reference) == 0
        assert ran == expected
        labels = [name or "auto" for name in expected]
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if line.startswith("N = 16, ")]   # "N = 16, BACKEND: fit ..."
        assert [row.split(",")[1].split(":")[0].strip() for row in rows] == labels
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"trace-n16-{b}.json" for b in labels)
