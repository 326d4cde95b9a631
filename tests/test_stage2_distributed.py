"""Stage 2 in a process group (gloo, 2 CPU processes spawned by the test, bounded in time) against one process: the
tiny open_clip ViT fine-tuned on a few generated images. All the 2-rank runs share one spawn (starting Python and
torch per rank is the slow part); the parent runs the one-process references and compares.

With a combined batch of 5 images over 2 ranks, each step splits 3 + 2 and the last step (21 = 4 x 5 + 1 images)
gives rank 0 one image and rank 1 none, so uneven and empty shares are both exercised.
"""
import contextlib
import io
import pathlib

import numpy as np
import pytest
import torch

import laic.distributed as ld
from laic import stage2
from laic.cli import main
from laic.stage2 import data as stage2_data
from laic.profiling import FitProfiler
from laic.stage2.parallel import EpochBatches
from tiny_clip import register_tiny_clip

N_IMAGES, K, DIM = 21, 3, 32
SPAWN_TIMEOUT_S = 120

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Interrupted(Exception):
    pass


class FixedProbabilities:
    """Stand-in for a fitted stage-1 model (stage 2 asks it for K only here: the probabilities are passed)."""

    n_clusters = K


def make_clip():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model_and_transforms(register_tiny_clip())[0].eval()


def write_images(folder: pathlib.Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(N_IMAGES):
        base = rng.integers(0, 256, 3)   # one colour per image plus noise: images that differ from one another
        pixels = np.clip(base + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")


def inputs(folder: pathlib.Path) -> dict:
    """The same arguments on every rank: paths, stage-1 probabilities, text counterparts (generated from seeds)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (N_IMAGES, K))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    text = rng.normal(size=(N_IMAGES, DIM))
    return {"image_paths": sorted(str(p) for p in folder.glob("*.png")), "stage1_probs": probs.astype(np.float32),
            "text_counterparts": (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)}


def config(epochs: int, **overrides):
    # keep_fraction 1: every image is pseudo-labelled in every epoch, so the batches' sizes are known in advance.
    settings = dict(epochs=epochs, batch_size=5, n_blocks=1, encoder_lr=2e-3, head_lr=2e-2, num_workers=0,
                    keep_fraction=1.0, min_per_cluster=1, eval_batch_size=8)
    return stage2.Stage2Config(**dict(settings, **overrides))


def run(folder, epochs, checkpoint_dir=None, resume=False, on_epoch_end=None, **overrides):
    return stage2.fine_tune(FixedProbabilities(), make_clip(), config=config(epochs, **overrides),
                            checkpoint_dir=checkpoint_dir, resume=resume, on_epoch_end=on_epoch_end, device="cpu",
                            **inputs(folder))


def interrupt_after_first_epoch(epoch, stats):
    if epoch == 0:
        raise Interrupted("stopped after epoch 0")


def summary(result) -> dict:
    return {"trainable": stage2.trainable_state(result.encoder.model), "probs": result.probs,
            "history": result.history, "notes": result.notes}


def failing_reads_on_rank_1_in_epoch_1(original):
    def read(self, j):
        if ld.current().rank == 1 and self.epoch == 1:
            raise OSError("the disk went away")
        return original(self, j)
    return read


def cli_fit_images_with_a_vocabulary_missing_on_rank_1(folder, out):
    """(exit status, stderr) of `laic fit --images` where rank 1's --vocab does not exist: each rank raised its own
    error before (rank 0 none: it went on and waited for rank 1 in a collective)."""
    vocab = out / "vocab"
    if ld.current().is_main():
        vocab.mkdir(exist_ok=True)
        np.save(vocab / "embeddings.npy", np.random.default_rng(0).normal(size=(6, DIM)).astype(np.float32))
        (vocab / "nouns.txt").write_text("".join(f"noun{i}\n" for i in range(6)))
    ld.from_main(ld.current().group, lambda: None, "writing the vocabulary")
    argv = ["fit", "--images", str(folder), "--model", register_tiny_clip(), "--pretrained", "random", "--vocab",
            str(vocab if ld.current().rank == 0 else out / "no-vocab"), "--k", "2", "--out", str(out / "cli-run"),
            "--embed-cache", str(out / "cli-cache"), "--device", "cpu"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return status, stderr.getvalue()


def stage2_on_rank(folder, out):
    """Every 2-rank scenario, in order; returns what the parent compares."""
    torch.set_num_threads(1)
    cli_bad_vocab = cli_fit_images_with_a_vocabulary_missing_on_rank_1(folder, out)
    results = {"one_epoch": summary(run(folder, 1, out / "one_epoch_two_ranks"))}
    # Profiled (as `laic fit --images --profile` profiles every rank's stage 2): it must neither hang nor change the
    # training.
    profiler = FitProfiler(torch.device("cpu"))
    with profiler.recording():
        results["accumulated"] = summary(run(folder, 1, grad_accum_steps=2))
    results["profiled_steps"] = [(s["name"], s["kind"]) for s in profiler.steps]
    # Interrupted after epoch 0 (on every rank): the parent resumes it in one process.
    try:
        run(folder, 2, out / "two_ranks", on_epoch_end=interrupt_after_first_epoch)
    except Interrupted as exc:   # raised alike on every rank: itself, as in one process (a RankFailed before)
        results["interrupted"] = str(exc)
    # A checkpoint the parent wrote in one process, resumed here on two.
    results["resumed_from_one"] = summary(run(folder, 2, out / "one_rank", resume=True))
    # Rank 1 cannot read an image in epoch 1: every rank must stop with the same message, the checkpoint of epoch 0
    # intact.
    original = stage2_data.TwoViews.__getitem__
    stage2_data.TwoViews.__getitem__ = failing_reads_on_rank_1_in_epoch_1(original)
    try:
        run(folder, 2, out / "failure")
        results["failure"] = None
    except Exception as exc:  # the parent checks its type and message
        results["failure"] = (type(exc).__name__, str(exc))
    finally:
        stage2_data.TwoViews.__getitem__ = original
    results["cli_bad_vocab"] = cli_bad_vocab
    results["shown"] = progress_shown_by_rank(folder)
    # Rank 0 alone inside one_process() (stage 2 trained on the group there: rank 0 waited for the others until the
    # timeout).
    if ld.current().rank == 0:
        with ld.one_process():
            results["alone"] = summary(run(folder, 1))
    return results


def progress_shown_by_rank(folder):
    """(laic's log lines, the bars on stderr) of a 2-epoch run with n_blocks=0, where laic's INFO lines are shown
    (as `laic fit` shows them): process 0 alone says the n_blocks note, each epoch and draws the bars."""
    import logging

    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("laic")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            run(folder, 2, n_blocks=0)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [line.lstrip("\r") for line in stderr.getvalue().split("\n")]   # a bar redraws itself after a \r
    bars = [line.split(":")[0] for line in lines if line.startswith("embedding images")]
    return [line for line in logged if line.startswith("stage 2")], bars


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_images(folder)
    return folder


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory):
    """One-process references: one epoch, two epochs uninterrupted; and a one-process checkpoint after epoch 0."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.raises(Interrupted):
        run(folder, 2, out / "one_rank", on_epoch_end=interrupt_after_first_epoch)
    return {"out": out, "one_epoch": summary(run(folder, 1, out / "one_epoch_one_rank")),
            "two_epochs": summary(run(folder, 2)),
            "accumulated": summary(run(folder, 1, grad_accum_steps=2))}


@pytest.fixture(scope="module")
def ranks(folder, single):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAIC_DIST_TIMEOUT_S", "60")
        return ld.spawn(stage2_on_rank, 2, folder, single["out"], timeout_s=SPAWN_TIMEOUT_S, backend="gloo")


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """The parameter less the attention's key bias, whose gradient is zero in exact arithmetic (adding the same number
    to every key's score leaves the softmax unchanged): its computed gradient is rounding noise, which Adam (dividing
    by the gradient's own scale) turns into steps of the learning rate's size in directions that depend on the
    reduction order. It is not compared."""
    if name.endswith("attn.in_proj_bias"):
        dim = len(value) // 3
        return torch.cat([value[:dim], value[2 * dim:]])
    return value


def assert_same_training(got: dict, expected: dict) -> None:
    """Equal up to float rounding. The combined batch's gradient is the same sum as one process's, added in another
    order (each rank sums its share, the all-reduce adds the shares; BLAS blocks a batch of 3 otherwise than one of
    5), so the gradients differ in the last bits, and the Adam steps carry that to the weights: measured at most
    ~2e-6 here, so 2e-5, still far below one step's change (the learning rates move weights by ~1e-3 per step)."""
    assert got["trainable"].keys() == expected["trainable"].keys()
    for name, value in expected["trainable"].items():
        torch.testing.assert_close(without_key_bias(name, got["trainable"][name]), without_key_bias(name, value),
                                   rtol=0, atol=2e-5, msg=name)
    np.testing.assert_allclose(got["probs"], expected["probs"], rtol=0, atol=1e-4)
    assert len(got["history"]) == len(expected["history"])
    for ours, theirs in zip(got["history"], expected["history"]):
        assert ours["images"] == theirs["images"] and ours["n_pseudo"] == theirs["n_pseudo"]
        for key in ("loss", "ce", "text"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key


def test_epoch_batches_split_the_one_process_batches_among_the_ranks():
    for n, batch, size in ((21, 5, 2), (21, 5, 3), (7, 4, 5), (16, 4, 2)):
        one = EpochBatches(n, batch, seed=3, epoch=1)
        shares = [list(EpochBatches(n, batch, seed=3, epoch=1, rank=r, size=size)) for r in range(size)]
        assert all(len(s) == len(one) for s in shares)
        for step, whole in enumerate(one):
            parts = [s[step] for s in shares]
            assert sum(parts, []) == whole                            # rank order gives one process's batch, in order
            assert max(map(len, parts)) - min(map(len, parts)) <= 1   # even up to one image
        assert sorted(sum(list(one), [])) == list(range(n))           # each image once per epoch


def adam_first_moments(folder: pathlib.Path):
    state = torch.load(folder / stage2.CHECKPOINT_NAME, weights_only=True)["optimizer"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


def test_one_epoch_on_two_ranks_equals_one_process_with_the_combined_batch(ranks, single):
    assert_same_training(ranks[0]["one_epoch"], single["one_epoch"])
    # Adam's steps do not depend on the gradients' scale; its first moment (a weighted sum of the epoch's gradients)
    # does: the ranks' gradients average to the combined batch's, not to a multiple of it.
    ours = adam_first_moments(single["out"] / "one_epoch_two_ranks")
    theirs = adam_first_moments(single["out"] / "one_epoch_one_rank")
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    # The replicas stay identical: DDP all-reduces the same gradients into every rank's optimiser.
    for name, value in ranks[0]["one_epoch"]["trainable"].items():
        assert torch.equal(ranks[1]["one_epoch"]["trainable"][name], value), name
    np.testing.assert_array_equal(ranks[1]["one_epoch"]["probs"], ranks[0]["one_epoch"]["probs"])


def test_gradient_accumulation_on_two_ranks_equals_one_process(ranks, single):
    # Batches accumulated in pairs: DDP skips the all-reduce (no_sync) until the optimiser step.
    assert_same_training(ranks[0]["accumulated"], single["accumulated"])


def test_process_0_alone_shows_stage_2s_progress(ranks):
    (said, bars), (said_elsewhere, bars_elsewhere) = ranks[0]["shown"], ranks[1]["shown"]
    assert [line.split(":")[0] for line in said] == ["stage 2 with n_blocks=0 and no LoRA trains only the tower's "
                                                     "last norm (ln_post), its projection and the head",
                                                     "stage 2 epoch 1/2", "stage 2 epoch 2/2"]
    # The frozen features for the head's start (no image_features given), the relabelling that ends each epoch.
    assert bars == ["embedding images (frozen encoder)"] + ["embedding images (fine-tuned encoder)"] * 2, bars
    assert said_elsewhere == [] and bars_elsewhere == []


def test_each_rank_profiles_the_epochs_it_trains(ranks):
    """The two-rank run with gradient accumulation was profiled on both ranks (and still equals one process's)."""
    for r in ranks:
        assert r["profiled_steps"] == [("stage 2 epoch 1/1", "stage-2")]   # its relabelling ends the epoch


def test_a_checkpoint_written_on_two_ranks_resumes_in_one_process(ranks, single, folder):
    # Raised alike on every rank: in its own words, as one process says it.
    assert all(r["interrupted"] == "stopped after epoch 0" for r in ranks)
    checkpoint = single["out"] / "two_ranks" / stage2.CHECKPOINT_NAME
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0
    resumed = summary(run(folder, 2, checkpoint.parent, resume=True))
    assert any("resumed" in note for note in resumed["notes"])
    assert_same_training(resumed, single["two_epochs"])


def test_a_checkpoint_written_in_one_process_resumes_on_two_ranks(ranks, single):
    for r in ranks:
        assert any("resumed" in note for note in r["resumed_from_one"]["notes"])
    assert_same_training(ranks[0]["resumed_from_one"], single["two_epochs"])


def test_a_failure_on_one_rank_stops_every_rank_with_one_message_and_keeps_the_checkpoint(ranks, single):
    failures = {r["failure"] for r in ranks}
    assert len(failures) == 1
    kind, message = failures.pop()
    assert kind == "RankFailed"
    assert message.startswith("stage 2 (epoch 1, step 0) failed on rank 1 of 2: OSError: the disk went away")
    assert message.endswith("all 2 ranks stopped")
    folder = single["out"] / "failure"
    assert [p.name for p in folder.iterdir()] == [stage2.CHECKPOINT_NAME]   # no temporary file left behind
    assert torch.load(folder / stage2.CHECKPOINT_NAME, weights_only=True)["epoch"] == 0



def test_fit_images_with_bad_input_on_one_rank_stops_every_rank_with_one_message(ranks):
    assert [status for status, _ in (r["cli_bad_vocab"] for r in ranks)] == [2, 2]
    said = ranks[0]["cli_bad_vocab"][1]
    assert said.count("laic fit: error:") == 1 and "reading the inputs failed on rank 1 of 2" in said
    assert "no-vocab" in said and ranks[1]["cli_bad_vocab"][1] == ""


def test_stage_2_inside_one_process_trains_on_that_process_alone(single, ranks):
    alone, reference = ranks[0]["alone"], single["one_epoch"]
    assert alone["trainable"].keys() == reference["trainable"].keys()
    for name, value in alone["trainable"].items():
        assert torch.equal(value, reference["trainable"][name]), name
    np.testing.assert_array_equal(alone["probs"], reference["probs"])
    assert "alone" not in ranks[1]


# Run by torchrun (2 processes) in the test below: rank 1's loader worker is killed reading its first image
# (SIGKILL, as the out-of-memory killer), while that rank waits for it in the first step (one step of all images).
# Each rank writes what it said to a file of its own: printed, the two ranks' lines share torchrun's stdout, and one
# run in about five joined them on one line ("... all 2 ranks stoppedrank 1: ...").
WORKER_KILLED_ON_RANK_1 = """
import os, pathlib, signal, sys
sys.path.insert(0, {tests!r})
import torch
import laic.distributed as ld
import laic.stage2.data as stage2_data
from laic.distributed import CollectiveMachineError
import test_stage2_distributed as t

ld.init()
read = stage2_data.readable

def dies_on_rank_1(path):
    if ld.current().rank == 1 and torch.utils.data.get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return read(path)

stage2_data.readable = dies_on_rank_1
try:
    t.run(pathlib.Path({folder!r}), 1, num_workers=2, batch_size=t.N_IMAGES)
except CollectiveMachineError as exc:
    pathlib.Path({said!r}, f"rank{{ld.current().rank}}.txt").write_text(f"rank {{ld.current().rank}}: {{exc}}\\n")
"""


def test_a_loader_worker_killed_on_one_rank_is_one_line_on_every_rank(tmp_path):
    # Its RuntimeError went through the step's collective check as an error of the code's own: a traceback on every
    # rank ("stage 2 ... failed on rank 1 of 2: RuntimeError: DataLoader worker (pid(s) N) exited unexpectedly").
    import os
    import re
    import subprocess
    import sys

    from laic.distributed.spawn import free_port

    write_images(tmp_path / "images")
    paths = inputs(tmp_path / "images")["image_paths"]
    script = tmp_path / "killed_on_rank_1.py"
    script.write_text(WORKER_KILLED_ON_RANK_1.format(tests=str(pathlib.Path(__file__).parent),
                                                     folder=str(tmp_path / "images"), said=str(tmp_path)))
    env = {**os.environ, "LAIC_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, timeout=240, env=env)
    said = sorted(line for rank in (0, 1) if (tmp_path / f"rank{rank}.txt").is_file()
                  for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines())
    assert len(said) == 2, (done.stdout[-2000:], done.stderr[-3000:])
    named = {re.search(r"was reading (\S+): ", line).group(1) for line in said}
    assert len(named) == 1 and named <= set(paths), said   # one image of the folder, named alike on both ranks
    for rank, line in enumerate(said):
        assert line.startswith(f"rank {rank}: stage 2 (epoch 0, step 0) failed on rank 1 of 2: WorkerDied: a "
                               "worker process reading images died (DataLoader worker (pid"), line
