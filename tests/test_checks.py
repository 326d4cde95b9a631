"""laic_kernels.checks.values_checked: the ops skip their NaN scans inside it, and only there."""
import re
import time

import pytest
import torch

from laic_kernels import checks, semantic_mix


def test_value_checks_are_skipped_only_inside_values_checked():
    bad = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    nouns = torch.eye(2)
    with pytest.raises(ValueError, match="images contains NaN"):
        semantic_mix(bad, nouns, 0.1)
    with checks.values_checked():
        checks.finite("x", bad)
        checks.all_finite(x=bad)
        out = semantic_mix(bad, nouns, 0.1)  # the caller vouched for its inputs: no scan, no error
        assert out.shape == (2, 2)
        # Argument checks still run.
        with pytest.raises(ValueError, match="tau"):
            semantic_mix(bad, nouns, -1.0)
    with pytest.raises(ValueError, match="contains NaN"):
        checks.finite("x", bad)
    with pytest.raises(ValueError, match="contains NaN"):
        checks.all_finite(x=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_entries_whose_sum_overflows_pass_and_bad_entries_fail(dtype):
    """The checks test a tensor's sum first: entries near the dtype's largest value, whose sum overflows to infinity,
    are still finite and pass; a NaN, an infinity, or infinities of both signs (a NaN sum) fail, naming the tensor
    with the bad entry among good ones whose sums overflow."""
    big = torch.full((64, 3), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not bool(torch.isfinite(big.sum()))
    checks.finite("big", big)
    checks.all_finite(big=big, small=torch.ones(2, dtype=dtype))
    for bad_value in (float("nan"), float("inf"), float("-inf"), (float("inf"), float("-inf"))):
        bad = torch.ones(5, 3, dtype=dtype)
        if isinstance(bad_value, tuple):
            bad[1, 1], bad[3, 2] = bad_value
        else:
            bad[2, 1] = bad_value
        assert not checks.is_finite(bad)
        with pytest.raises(ValueError, match="bad contains NaN"):
            checks.finite("bad", bad)
        with pytest.raises(ValueError, match="bad contains NaN"):
            checks.all_finite(big=big, bad=bad)
    assert checks.is_finite(big) and checks.is_finite(torch.empty(0, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_half_rows_are_proven_finite_by_their_sum_alone(dtype):
    # Summed in their own dtype, 200k x 512 unit rows overflowed float16 (inf), and every check read them twice.
    rows = torch.nn.functional.normalize(torch.rand(200_000, 512) + 1.0, dim=1).to(dtype)
    assert bool(checks.sum_is_finite(rows))
    rows[7, 3] = float("nan")
    assert not bool(checks.sum_is_finite(rows)) and not checks.is_finite(rows)


def test_value_checks_record_nothing_for_autograd():
    # The finite check summed features that require grad with autograd recording, saving the sum for a backward that
    # never comes (consistent_neighbours saved one per call, for outputs with no gradient).
    leaf = torch.randn(6, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        flag = checks.sum_is_finite(leaf)
        checks.finite("leaf", leaf)
        checks.all_finite(leaf=leaf, other=torch.ones(2))
    assert saved == [] and not flag.requires_grad and bool(flag)


@pytest.mark.filterwarnings("ignore:each image's neighbour lists")
def test_laic_fit_and_predict_name_the_non_finite_rows():
    # It said "clean the input (e.g. torch.nan_to_num) first", after which a NaN row became all zeros (refused
    # next) and an infinite entry a row along one axis, clustered as if real; the rows were not named.
    from laic import LAIC

    images = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    images[3, 2], images[17, 0] = float("inf"), float("nan")
    said = "2 of 30 row(s) contain NaN or infinite values: rows 3, 17; compute those images again"
    with pytest.raises(ValueError, match="^" + re.escape("image_features: " + said)) as raised:
        LAIC(n_clusters=2).fit(images, torch.randn(5, 8))
    assert "nan_to_num" not in str(raised.value)
    model = LAIC(n_clusters=2, stage1_steps=0).fit(images[:3], torch.randn(5, 8))
    with pytest.raises(ValueError, match="1 of 30 row.s. contain NaN or infinite values: rows 17; compute those"):
        model.predict(images.index_fill(1, torch.tensor([2]), 0.5))
    # A noun row goes with its name (it said "dropping them moves every later row off its noun"; a QA helper, 12-08).
    nouns = torch.randn(5, 8)
    nouns[4, 1] = float("nan")
    with pytest.raises(ValueError, match="^" + re.escape("noun_features: 1 of 5 row(s) contain NaN or infinite "
                                                         "values: rows 4; drop them with their names, or compute "
                                                         "those nouns again") + "$"):
        LAIC(n_clusters=2).fit(images[:3], nouns)


def test_laic_fit_names_all_zero_rows():
    import numpy as np

    from laic import LAIC

    images = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    images[[4, 17]] = 0.0
    with pytest.raises(ValueError, match=r"image_features: 2 of 30 row\(s\) are all zeros .*rows 4, 17"):
        LAIC(n_clusters=2).fit(images, np.eye(8, dtype=np.float32))


@pytest.mark.parametrize("value", [True, False, __import__("numpy").True_, __import__("numpy").False_])
def test_true_or_false_accepts_python_and_numpy_bools(value):
    checks.true_or_false("use_text", value)


@pytest.mark.parametrize("value", [1, 0, "yes", "False", None, 1.0, __import__("numpy").int64(1)])
def test_true_or_false_refuses_anything_else_naming_the_option_and_the_fix(value):
    with pytest.raises(ValueError, match=r"relation_view must be True or False, got .*; pass a bool, e.g. "
                                         r"relation_view=True"):
        checks.true_or_false("relation_view", value)


def _numbers_of_each_kind():
    import fractions

    import numpy as np
    ints = [0, -3, 2**70, np.int8(5), np.int64(-1), np.uint64(7)]
    reals = [0.5, float("nan"), float("inf"), np.float16(1), np.float32(-2.5), np.float64(3), fractions.Fraction(1, 3)]
    neither = [True, False, np.True_, "3", b"3", None, 1j, np.complex64(1), [1], torch.tensor(1)]
    return ints, reals, neither


def test_is_int_and_is_real_follow_the_number_tower_without_bools():
    # The one test of "a number, not a bool" the settings share: Python's number tower (numbers.Integral, .Real)
    # says what each value is; a bool is an int there, and refused here since True would pass as 1.
    ints, reals, neither = _numbers_of_each_kind()
    for value in ints:
        assert checks.is_int(value) and checks.is_real(value), value
    for value in reals:
        assert not checks.is_int(value) and checks.is_real(value), value
    for value in neither:
        assert not checks.is_int(value) and not checks.is_real(value), value


def test_settings_take_numpy_numbers_and_refuse_bools_by_name():
    import numpy as np

    from laic.distributed.spawn import spawn
    from laic.report import write_report

    with pytest.raises(ValueError, match=r"timeout_s must be a positive finite number of seconds, got True"):
        spawn(print, 1, timeout_s=True)
    with pytest.raises(ValueError, match=r"timeout_s must be a positive finite number of seconds, got np.float32\(nan\)"):
        spawn(print, 1, timeout_s=np.float32("nan"))
    with pytest.raises(ValueError, match=r"per_cluster \(--per-cluster\) must be an int between 1 and 1024, got True"):
        write_report("no such run", per_cluster=True)
    # numpy's numbers pass (spawn refused np.float32(60) before), and a Fraction is waited for as a float.
    with pytest.raises(FileNotFoundError):   # past the check: the run folder is read next
        write_report("no such run", per_cluster=np.int64(3))
    import fractions
    assert spawn(abs, 1, -3, timeout_s=np.float32(120)) == [3]
    with pytest.raises(TimeoutError, match=r"within 0.5 s"):
        spawn(time.sleep, 1, 60, timeout_s=fractions.Fraction(1, 2))


def test_every_on_off_option_of_laic_goes_through_the_one_check():
    # LAIC's switches and refine's semantic_centres alike: a numpy bool is accepted, an int is refused by name.
    import numpy as np

    from laic import LAIC
    from laic.refine import check_options

    check_options(np.True_, "kmeans")
    with pytest.raises(ValueError, match="semantic_centres must be True or False"):
        check_options(1, "kmeans")
    for name in ("use_text", "relation_view", "semantic_centres"):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 1 .int.; pass a bool"):
            LAIC(n_clusters=2, **{name: 1}).fit(torch.randn(30, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="relation_fused must be 'auto', True or False, got 1 .int."):
        LAIC(n_clusters=2, relation_fused=1).fit(torch.randn(30, 8), torch.randn(5, 8))


def test_meta_tensors_and_the_meta_device_are_refused_by_name():
    """The 'meta' device holds no values: a clear error naming the argument (before: "Tensor.item() cannot be
    called on meta tensors" from deep inside the op)."""
    import laic_kernels
    from laic import LAIC

    meta = torch.empty(6, 4, device="meta")
    with pytest.raises(ValueError, match="features is on the 'meta' device"):
        laic_kernels.knn_graph(meta, 2)
    with pytest.raises(ValueError, match="images is on the 'meta' device"):
        semantic_mix(meta, torch.randn(3, 4), 0.1)
    with pytest.raises(ValueError, match="device='meta' holds shapes but no values"):
        LAIC(n_clusters=2, device="meta").fit(torch.randn(30, 8), torch.randn(5, 8))


# What a second mutation audit (12-05) changed unnoticed in the ops' argument checks.

@pytest.mark.parametrize("call, match", [
    (lambda: __import__("laic_kernels").sinkhorn(torch.rand(3, 2), eps=float("inf")), "eps must be a positive finite"),
    (lambda: semantic_mix(torch.eye(2), torch.eye(2), float("inf")), "tau must be a positive finite"),
    (lambda: __import__("laic_kernels").similarity_topk(torch.eye(2), torch.eye(3, 2), True), "k must be an int"),
    (lambda: __import__("laic_kernels").knn_graph(torch.eye(3), True), "k must be an int"),
    (lambda: __import__("laic_kernels").sinkhorn(torch.rand(3, 2), n_iters=True), "n_iters must be an int"),
])
def test_an_infinite_scale_or_a_bool_count_is_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_products_past_half_of_float32s_largest_value_are_refused():
    # The margin is half of float32's largest value (a sum of D such products must not overflow): 4 a^2 between
    # MAX / 2 and MAX was accepted when the margin was the whole of it.
    import math

    from laic_kernels import similarity_topk
    largest = torch.finfo(torch.float32).max
    beyond = math.sqrt(0.75 * largest / 4)
    with pytest.raises(ValueError, match="overflow"):
        similarity_topk(torch.full((2, 4), beyond), torch.full((3, 4), beyond), 1)
    within = math.sqrt(0.45 * largest / 4)
    assert similarity_topk(torch.full((2, 4), within), torch.full((3, 4), within), 1)[1].shape == (2, 1)


def test_an_auto_backend_in_the_environment_is_automatic(monkeypatch):
    from laic_kernels import backends, sinkhorn
    for value in ("auto", " AUTO "):
        monkeypatch.setenv(backends.ENV_VAR, value)
        assert backends.forced_backend() is None
        assert sinkhorn(torch.rand(3, 2)).shape == (3, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, dim", [((7, 13), 1), ((7, 13), 0), ((3, 5, 9), 2), ((3, 5, 9), 1), ((1, 1), 1),
                                        ((6, 517), None), ((257, 33), -1)])
@pytest.mark.parametrize("keepdim", [False, True])
def test_extremes_are_torch_aminmax_nan_and_infinities_included(dtype, shape, dim, keepdim):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 100).to(dtype)
    flat = x.view(-1)
    flat[3 % flat.numel()] = float("inf")
    if flat.numel() > 5:
        flat[5] = float("-inf")
        flat[-1] = float("nan")
    low, high = checks.extremes(x, dim, keepdim)
    want = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim, keepdim=keepdim)
    for got, expected in zip((low, high), want):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_a_wrong_number_of_dimensions_is_said_in_words():
    # "balance_weights must have 1 dimensions" (a QA helper, 12-08).
    with pytest.raises(ValueError, match=r"^w must have 1 dimension, got shape \(3, 1\)$"):
        checks.tensor("w", torch.ones(3, 1), ndim=1)
    with pytest.raises(ValueError, match=r"^w must have 2 dimensions, got shape \(3,\)$"):
        checks.tensor("w", torch.ones(3), ndim=2)
