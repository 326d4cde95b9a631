"""similarity_topk: the Triton kernel (interpreter on CPU, compiled on CUDA) against the chunked reference."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip(
    "triton", reason="Triton is not installed (a CPU-only torch does not bring it); its kernels' tests need it")

import laic_kernels
from laic_kernels.triton import COMPILE_OPTIONS
from laic_kernels import reference
from laic_kernels.triton import similarity_topk as kernel

from conftest import poisoned_like


def triton_topk(queries, keys, k, exclude_self=False):
    with laic_kernels.use_backend("triton"):
        return laic_kernels.similarity_topk(queries, keys, k, exclude_self=exclude_self)


def assert_valid_topk(queries, keys, k, values, indices, exclude_self=False, atol=1e-5):
    """Indices valid and distinct per row, never self with exclude_self, values equal to the similarities at those
    indices (recomputed in float64) and sorted descending; everything compared with the reference's values."""
    n, m = queries.shape[0], keys.shape[0]
    assert values.shape == (n, k) and values.dtype == torch.float32
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    assert bool(((indices >= 0) & (indices < m)).all())
    assert all(len(set(row.tolist())) == k for row in indices.cpu())
    if exclude_self:
        assert not bool((indices == torch.arange(n, device=indices.device)[:, None]).any())
    exact = (queries.double()[:, None, :] * keys.double()[indices]).sum(-1)
    torch.testing.assert_close(values.double(), exact, atol=atol, rtol=1e-5)
    assert bool((values[:, :-1] >= values[:, 1:]).all())
    ref_values, _ = reference.similarity_topk(queries, keys, k, exclude_self=exclude_self)
    torch.testing.assert_close(values, ref_values, atol=atol, rtol=1e-5)


def recall(indices, ref_indices):
    hits = sum(len(set(a) & set(b)) for a, b in zip(indices.tolist(), ref_indices.tolist()))
    return hits / ref_indices.numel()


@pytest.mark.parametrize("n, m, d, k", [
    (1, 1003, 33, 7),      # one query, many keys: the split-keys path and its merge
    (37, 1003, 40, 5),     # odd shapes, several key tiles per split
    (37, 70, 16, 70),      # k = M
    (37, 70, 16, 1),       # k = 1
    (5, 200, 64, 128),     # the largest on-chip k
])
def test_matches_reference_fp32(device, n, m, d, k):
    gen = torch.Generator().manual_seed(n * 1000 + m + k)
    queries = torch.randn(n, d, generator=gen).to(device)
    keys = torch.randn(m, d, generator=gen).to(device)
    values, indices = triton_topk(queries, keys, k)
    assert_valid_topk(queries, keys, k, values, indices)
    _, ref_indices = reference.similarity_topk(queries, keys, k)
    assert recall(indices, ref_indices) == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(11)
    queries = torch.randn(37, 48, generator=gen).to(device, dtype)
    keys = torch.randn(300, 48, generator=gen).to(device, dtype)
    values, indices = triton_topk(queries, keys, 9)
    # Products of half inputs are exact in float32; only the summation order differs from the reference.
    assert_valid_topk(queries, keys, 9, values, indices, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 44])
def test_exclude_self(device, k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(45, 24, generator=gen).to(device)
    values, indices = triton_topk(x, x, k, exclude_self=True)
    assert_valid_topk(x, x, k, values, indices, exclude_self=True)
    _, ref_indices = reference.similarity_topk(x, x, k, exclude_self=True)
    assert recall(indices, ref_indices) == 1.0


def test_duplicate_rows_tie(device):
    """Keys repeated three times each: tied values equal the reference, indices stay valid and distinct."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(23, 20, generator=gen)
    keys = base[torch.arange(69) % 23].to(device)
    queries = torch.randn(9, 20, generator=gen).to(device)
    values, indices = triton_topk(queries, keys, 8)
    assert_valid_topk(queries, keys, 8, values, indices)
    # With exclude_self on a set with duplicates, each row's twin ties with itself at the top.
    values, indices = triton_topk(keys, keys, 5, exclude_self=True)
    assert_valid_topk(keys, keys, 5, values, indices, exclude_self=True)


@pytest.mark.parametrize("plan", kernel.plans(6), ids=str)
def test_poisoned_outputs_forced_key_splits(device, plan):
    """Every output element is written, on the single-pass and on the split-and-merge path, with every tile plan."""
    gen = torch.Generator().manual_seed(5)
    queries = torch.randn(70, 17, generator=gen).to(device)
    keys = torch.randn(333, 17, generator=gen).to(device)
    for splits in (1, 3):
        values = poisoned_like(torch.empty(70, 6, device=device))
        indices = poisoned_like(torch.empty(70, 6, dtype=torch.int64, device=device))
        kernel.similarity_topk_into(queries, keys, 6, False, values, indices, key_splits=splits, plan=plan)
        assert_valid_topk(queries, keys, 6, values, indices)


@pytest.mark.parametrize("plan", kernel.plans(4), ids=str)
def test_exclude_self_across_key_splits(device, plan):
    """The diagonal is found by global row and key index, also in a split that starts past key 0."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(150, 16, generator=gen).to(device)
    values = poisoned_like(torch.empty(150, 4, device=device))
    indices = poisoned_like(torch.empty(150, 4, dtype=torch.int64, device=device))
    kernel.similarity_topk_into(x, x, 4, True, values, indices, key_splits=2, plan=plan)
    assert_valid_topk(x, x, 4, values, indices, exclude_self=True)


@pytest.mark.parametrize("n, m, k, exclude_self", [(37, 300, 5, False), (37, 70, 70, False), (5, 200, 128, False),
                                                   (45, 45, 44, True), (130, 130, 10, True)])
def test_every_plan_matches_reference(device, n, m, k, exclude_self):
    """Whichever plan tuning picks on a GPU, the answer is the reference's: odd shapes, k up to M, rows and keys
    past a tile's end."""
    gen = torch.Generator().manual_seed(n + m + k)
    queries = torch.randn(n, 24, generator=gen).to(device)
    keys = queries if exclude_self else torch.randn(m, 24, generator=gen).to(device)
    _, ref_indices = reference.similarity_topk(queries, keys, k, exclude_self=exclude_self)
    for plan in kernel.plans(k):
        values = poisoned_like(torch.empty(n, k, device=device))
        indices = poisoned_like(torch.empty(n, k, dtype=torch.int64, device=device))
        kernel.similarity_topk_into(queries, keys, k, exclude_self, values, indices, plan=plan)
        assert_valid_topk(queries, keys, k, values, indices, exclude_self=exclude_self)
        assert recall(indices, ref_indices) == 1.0, plan


def test_ties_across_tiles_keep_the_lower_index_with_every_plan(device):
    """23 integer-valued keys repeated 13 times (299 keys: exact, equal products in every tile): each row's k best
    are the reference's, indices included, the lower index first among equal values, whatever the tiling."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randint(-3, 4, (23, 16), generator=gen).float()
    keys = base[torch.arange(299) % 23].to(device)
    queries = torch.randint(-3, 4, (70, 16), generator=gen).float().to(device)
    ref_values, ref_indices = reference.similarity_topk(queries, keys, 30)
    for plan in kernel.plans(30):
        values = poisoned_like(torch.empty(70, 30, device=device))
        indices = poisoned_like(torch.empty(70, 30, dtype=torch.int64, device=device))
        kernel.similarity_topk_into(queries, keys, 30, False, values, indices, plan=plan)
        assert torch.equal(values.cpu(), ref_values.cpu()) and torch.equal(indices.cpu(), ref_indices.cpu()), plan


def test_products_that_underflow_float32_are_refused():
    """Rows of 1e-25 gave similarities of exactly 0 (float32's products underflow), ranked by index: refused, naming
    the row. A zero row (no direction) and rows of ordinary small scale pass, as does semantic_mix's check."""
    generator = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(5, 8, generator=generator), torch.randn(50, 8, generator=generator)
    tiny = queries.clone()
    tiny[3] *= 1e-45 / tiny[3].abs().max()        # a subnormal row
    for q, k, small in ((queries * 1e-25, keys * 1e-25, r"row \d of queries"), (tiny, keys, "row 3 of queries"),
                        (tiny.double(), keys.double() * 1e-10, "row 3 of queries"),
                        (queries, keys * 1e-35, "keys")):
        with pytest.raises(ValueError, match=small + r" is too small: .* float32 .* loses their precision"):
            laic_kernels.similarity_topk(q, k, 3)
    with pytest.raises(ValueError, match=r"row 3 of images is too small"):
        laic_kernels.semantic_mix(tiny, keys, 0.1)
    zero_row = queries.clone()
    zero_row[1] = 0
    got = laic_kernels.similarity_topk(zero_row * 1e-12, keys * 1e-12, 3)
    want = reference.similarity_topk(zero_row.double(), keys.double(), 3)
    assert torch.equal(got[1][[0, 2, 3, 4]], want[1][[0, 2, 3, 4]])
    # float64 rows whose magnitudes' product underflows a double (1e-170 x 1e-170) are still refused: only keys that
    # are all zero pass.
    with pytest.raises(ValueError, match="is too small"):
        laic_kernels.similarity_topk(queries.double() * 1e-170, keys.double() * 1e-170, 3)
    # float64 rows below float32's smallest normal number whose products with large keys pass that check: cast to
    # float32 they would be zero, ranked by index.
    small_queries = queries.double() * 1e-36
    small_queries[3] *= 1e-11                                    # 1e-47: zero in float32
    for q, k, small in ((small_queries, keys.double() * 1e37, "row 3 of queries"),
                        (queries.double() * 1e37, keys.double() * 1e-46, "keys")):
        with pytest.raises(ValueError, match=small + r" is too small: .* below float32's smallest normal number"):
            laic_kernels.similarity_topk(q, k, 3)
    with pytest.raises(ValueError, match=r"row 3 of images is too small: .* below float32's smallest normal"):
        laic_kernels.semantic_mix(small_queries, keys.double() * 1e37, 1.0)
    # float32 subnormal rows are the values given: the product's check alone applies (1e-44 x 1e37 passes it).
    subnormal = (small_queries * 1e3).float()                    # row 3 at about 1e-44
    assert 0 < float(subnormal[3].abs().max()) < torch.finfo(torch.float32).tiny
    got = laic_kernels.similarity_topk(subnormal, keys * 1e37, 3)
    assert torch.equal(got[1], reference.similarity_topk(subnormal, keys * 1e37, 3)[1])
    # All-zero keys: every product is exactly 0 (nothing to lose), so they pass, ranked by index as the reference.
    zero_keys = torch.zeros_like(keys)
    for got, want in zip(laic_kernels.similarity_topk(queries, zero_keys, 3),
                         reference.similarity_topk(queries, zero_keys, 3)):
        assert torch.equal(got, want)
    assert torch.equal(laic_kernels.semantic_mix(queries, zero_keys, 0.1),
                       reference.semantic_mix(queries, zero_keys, 0.1))


def test_products_that_could_overflow_float32_are_refused():
    """Finite features whose products overflow float32 would rank -inf / NaN similarities: refused, naming the fix."""
    queries, keys = torch.full((3, 16), 1e20), torch.full((128, 16), -1e20)
    with pytest.raises(ValueError, match="may overflow float32.*normalise the rows"):
        laic_kernels.similarity_topk(queries, keys, 4)
    with pytest.raises(ValueError, match="reach 1e\\+20 and 1e\\+20"):
        laic_kernels.similarity_topk(queries, queries, 2, exclude_self=True)
    laic_kernels.similarity_topk(queries / 1e10, keys / 1e10, 4)    # 16 x 1e20 is well inside float32
    # float64 entries beyond float32's range are refused even when their products would be small.
    with pytest.raises(ValueError, match="may overflow float32"):
        laic_kernels.similarity_topk(torch.full((3, 4), 1e39, dtype=torch.float64),
                                     torch.full((5, 4), 1e-40, dtype=torch.float64), 2)
    # A caller that checked its values once (laic.LAIC.fit) skips the scan, as for the finite check.
    from laic_kernels import checks
    with checks.values_checked():
        checks.finite_dot_products("queries", queries, "keys", keys)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_are_refused_by_name(bad):
    """The same read finds a NaN or an infinity in either argument and names it (a set against itself: queries)."""
    good = torch.randn(40, 8)
    poisoned = good.clone()
    poisoned[17, 3] = bad
    with pytest.raises(ValueError, match="^queries contains NaN or infinite"):
        laic_kernels.similarity_topk(poisoned, good, 2)
    with pytest.raises(ValueError, match="^keys contains NaN or infinite"):
        laic_kernels.similarity_topk(good, poisoned, 2)
    with pytest.raises(ValueError, match="^queries contains NaN or infinite"):
        laic_kernels.similarity_topk(poisoned, poisoned, 2, exclude_self=True)


@pytest.mark.filterwarnings("ignore:overflow encountered")   # the interpreter's numpy matmul, meant here
def test_kernel_ranks_infinite_products(device):
    """Behind the public op's check the kernel still ranks -inf products as the reference does (the first k keys,
    lower index first): a tile of only -inf entries must not be skipped while a row's list is not yet full."""
    queries = torch.full((3, 16), 1e20, device=device)
    keys = torch.full((128, 16), -1e20, device=device)
    for plan in kernel.plans(4):
        values = poisoned_like(torch.empty(3, 4, device=device))
        indices = poisoned_like(torch.empty(3, 4, dtype=torch.int64, device=device))
        kernel.similarity_topk_into(queries, keys, 4, False, values, indices, plan=plan)
        assert bool((values == float("-inf")).all()), plan
        assert torch.equal(indices.cpu(), torch.arange(4).expand(3, 4)), plan


def test_non_contiguous_and_float64_inputs(device):
    gen = torch.Generator().manual_seed(7)
    queries = torch.randn(30, 2 * 19, generator=gen).to(device)[:, ::2]   # strided columns
    keys = torch.randn(19, 90, generator=gen).to(device).t()               # transposed
    assert not queries.is_contiguous() and not keys.is_contiguous()
    values, indices = triton_topk(queries, keys, 4)
    assert_valid_topk(queries, keys, 4, values, indices)
    values, indices = triton_topk(queries.double(), keys.double(), 4)
    assert_valid_topk(queries, keys, 4, values, indices)


def test_mixed_operand_dtypes_match_the_reference(device):
    # The kernel multiplies operands of one dtype: mixed ones are brought to a common one first (without that the
    # interpreter raised "Both operands must be same dtype", unnoticed by a mutation audit).
    gen = torch.Generator().manual_seed(9)
    queries, keys = torch.randn(20, 24, generator=gen), torch.randn(90, 24, generator=gen)
    for q_dtype, k_dtype in ((torch.float32, torch.float64), (torch.float16, torch.bfloat16),
                             (torch.bfloat16, torch.float32)):
        q, k = queries.to(device, q_dtype), keys.to(device, k_dtype)
        values, indices = triton_topk(q, k, 4)
        # Both are taken to float32, where the products of these values are exact: float32 summation error only
        # (2e-2 let a kernel that computed mixed operands in float16 pass).
        assert_valid_topk(q.double(), k.double(), 4, values, indices, atol=1e-5)


def test_keys_beyond_the_31_bit_index_go_to_the_reference():
    many = torch.zeros(1, 4).expand(2 ** 31 - 1, 4)     # a view: no memory
    assert "31-bit" in kernel.why_not(torch.zeros(2, 4), many, 5)
    assert kernel.why_not(torch.zeros(2, 4), many[1:], 5) is None


def test_large_k_goes_to_reference(device):
    queries = torch.randn(3, 8, device=device)
    keys = torch.randn(200, 8, device=device)
    assert "129" in kernel.why_not(queries, keys, 129)
    with pytest.raises(RuntimeError, match="on-chip top-k limit"):
        triton_topk(queries, keys, 129)
    if device.type == "cuda":  # automatic mode takes the reference instead
        values, _ = laic_kernels.similarity_topk(queries, keys, 129)
        torch.testing.assert_close(values, reference.similarity_topk(queries, keys, 129)[0])


def test_automatic_mode_uses_reference_on_cpu():
    from laic_kernels.backends import explain
    x = torch.randn(4, 8)
    assert "forced" in explain("similarity_topk", x, x, 2)["triton"]
    # The public functions' own arguments (sinkhorn's marginals by keyword, as its callers pass them); knn_graph
    # reaches similarity_topk's backends (it raised: no backends of its own).
    assert explain("knn_graph", x, 2).keys() == explain("similarity_topk", x, x, 2).keys()
    with pytest.raises(ValueError, match="laic_kernels has no op 'closed_form' to explain"):   # AttributeError
        explain("closed_form", x)


def test_custom_op_fake_kernel_and_opcheck():
    """The op is registered with a fake kernel, so torch.compile can trace through it."""
    op = torch.ops.laic_triton.similarity_topk.default
    with FakeTensorMode():
        values, indices = op(torch.empty(10, 8), torch.empty(40, 8), 3, False)
    assert values.shape == (10, 3) and values.dtype == torch.float32
    assert indices.shape == (10, 3) and indices.dtype == torch.int64
    gen = torch.Generator().manual_seed(0)
    torch.library.opcheck(op, (torch.randn(5, 8, generator=gen), torch.randn(40, 8, generator=gen), 3, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be between 1"),
    (dict(k=41), "k must be between 1"),
    (dict(k=2, exclude_self=True), "exclude_self=True needs"),
])
def test_bad_inputs(kwargs, match):
    queries, keys = torch.randn(5, 8), torch.randn(40, 8)
    with pytest.raises(ValueError, match=match):
        triton_topk(queries, keys, **kwargs)
    with pytest.raises(ValueError, match="same feature dimension"):
        triton_topk(queries, torch.randn(40, 9), 2)


# Run in a fresh interpreter without TRITON_INTERPRET (under it, triton.jit gives Python functions, not kernels).
# Integer arguments are specialised as Triton's launcher does from their values at the call ("ints"): 1 becomes a
# constant, a multiple of 16 is marked divisible by 16, as are the pointers (torch's allocations are aligned); without
# that the compiled code is not what runs (unaligned, the feature loop of similarity_topk is not even pipelined).
_COMPILE_FOR = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTERS = {"values_ptr": "*fp32", "out_ptr": "*fp32", "indices_ptr": "*i64", "partial_ptr": "*i64"}
tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
report = []
for launch in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module("laic_kernels.triton." + launch["module"]), launch["kernel"])
    pointers = dict(POINTERS, **launch.get("pointers", {}))
    ints = launch.get("ints", {})
    constants = dict(launch["constants"], **{name: 1 for name, value in ints.items() if value == 1})
    signature = {p.name: "constexpr" if p.is_constexpr or p.name in constants else pointers.get(p.name, "*" +
                 launch["dtype"]) if p.name.endswith("_ptr") else "fp32" if p.name == "logit_scale" else "i32"
                 for p in fn.params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if signature[p.name] != "constexpr"
             and (p.name.endswith("_ptr") or ints.get(p.name, 1) % 16 == 0)}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", int(sys.argv[2]), 32), options=launch["options"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    report.append(dict({key: int(re.search(key + r":(\d+)", usage).group(1)) for key in ("REG", "STACK")},
                       shared=compiled.metadata.shared, pipelined="cp.async" in compiled.asm["ptx"]))
print(json.dumps(report))
"""
# Shared memory one block may use on sm_90 (H100/H200): 227 KiB.
SM90_SHARED_LIMIT = 227 * 1024


def compile_for(launches, arch: int = 90):
    """Compile each launch ``{module, kernel, dtype, constants, options}`` for ``sm_<arch>`` ahead of time (no GPU
    needed; an optional ``pointers`` maps pointer arguments to their types where the defaults above do not fit, an optional
    ``ints`` gives integer arguments' values at the call, for the launcher's specialisation); returns each one's
    registers, spilled bytes per thread (STACK), shared memory and whether loads are software-pipelined."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR, json.dumps(launches), str(arch)], capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("Triton's ptxas is not installed: cannot compile for the GPU here")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def imagenet_topk_ints(k: int) -> dict:
    """similarity_topk's integer arguments at ImageNet scale (1.28M images against 82k nouns, D = 512, contiguous
    [N, k] outputs)."""
    return dict(N=1_281_167, M=82_115, D=512, keys_per_split=82_176, stride_qn=512, stride_qd=1, stride_kn=512,
                stride_kd=1, stride_vn=k, stride_in=k, stride_pn=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels are compiled and run for real")
def test_kernel_compiles_for_sm90_within_shared_memory():
    """The interpreter accepts code the GPU compiler rejects: compile the kernel as launched on an H100/H200 (tile
    plan, dot precision, warps, the launcher's specialisation) and check shared memory; every plan tuning may pick
    for bf16 at k = 10, 20 and 60, and float32 at float32 accuracy, must pipeline its loads and not spill."""
    def launch(plan, dtype, k, write_partial, precision):
        constants = kernel.kernel_constants(plan, k, 512, True, write_partial, precision, False)
        return dict(module="similarity_topk", kernel="_topk_kernel", dtype=dtype, constants=constants,
                    options=dict(num_warps=plan.num_warps, **COMPILE_OPTIONS), ints=imagenet_topk_ints(k))

    checked = [launch(plan, "bf16", k, False, "tf32") for k in (10, 20, 60) for plan in kernel.plans(k)]
    checked.append(launch(kernel.plans(10)[0], "fp32", 10, False, "tf32x3"))
    usages = compile_for(checked + [launch(kernel.plans(128)[0], "bf16", 128, True, "tf32")])
    for launched, usage in zip(checked, usages):
        c = launched["constants"]
        what = f"{launched['dtype']} k={c['K']} {c['BLOCK_N']}x{c['BLOCK_M']}/{launched['options']['num_warps']}w"
        assert usage["STACK"] == 0, f"{what} spills {usage['STACK']} bytes per thread ({usage['REG']} registers)"
        assert usage["pipelined"], f"{what}: loads not pipelined"
    for usage in usages:
        assert usage["shared"] <= SM90_SHARED_LIMIT, usage


def test_flags_must_be_bools():
    # A string such as "no" is truthy: it would have switched the flag on.
    q = torch.randn(5, 3)
    with pytest.raises(ValueError, match="exclude_self must be True or False"):
        laic_kernels.similarity_topk(q, q, 2, exclude_self="no")
    with pytest.raises(ValueError, match="return_graphs must be True or False"):
        laic_kernels.consistent_neighbours(q, q, 2, return_graphs="no")
