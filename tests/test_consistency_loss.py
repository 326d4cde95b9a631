"""consistency_loss: the reference against a naive loop-by-loop computation of the definition and gradcheck; the Triton
kernel (interpreter on CPU, CUDA when present) against the reference run in float64; input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

import laic_kernels
from laic_kernels import closed_form, consistency_loss, reference
from laic_kernels.backends import extension_import_error

TERMS = ("inst", "assign", "center", "bal")
EPS = 1e-8


def make_inputs(b, k, d, *, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    """Four logit matrices uniform in [-scale, scale], L2-normalised features, random positive balance weights."""
    gen = torch.Generator().manual_seed(seed)
    logits = [((torch.rand(b, k, generator=gen, dtype=torch.float64) * 2 - 1) * scale) for _ in range(4)]
    feats = [F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1) for _ in range(2)]
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    tensors = [t.to(device=device, dtype=dtype) for t in logits + feats]
    return tensors, weights.to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# The reference against the definition, written out with Python loops over samples and clusters


def _softmax_rows(m):
    out = []
    for row in m:
        top = max(row)
        e = [math.exp(x - top) for x in row]
        out.append([x / sum(e) for x in e])
    return out


def _column(m, k):
    return [row[k] for row in m]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _normalize(a):
    n = max(math.sqrt(_dot(a, a)), EPS)
    return [x / n for x in a]


def _neg_log_softmax_at(values, index):
    top = max(values)
    return -(values[index] - top - math.log(sum(math.exp(x - top) for x in values)))


def naive_consistency_loss(logits, feats, w, tau_a, tau_c, alpha, beta, gamma, delta):
    p, q, pn, qn = (_softmax_rows(m) for m in logits)
    u, v = feats
    b, k = len(p), len(p[0])
    inst = 0.0
    for i in range(b):
        inst -= math.log(_dot(p[i], qn[i]) + EPS) + math.log(_dot(q[i], pn[i]) + EPS) + math.log(_dot(p[i], q[i]) + EPS)
    inst /= 3 * b
    cols = [_normalize(_column(p, c)) for c in range(k)] + [_normalize(_column(q, c)) for c in range(k)]
    assign = 0.0
    for x in range(2 * k):
        others = [y for y in range(2 * k) if y != x]
        sims = [_dot(cols[x], cols[y]) / tau_a for y in others]
        assign += _neg_log_softmax_at(sims, others.index((x + k) % (2 * k)))
    assign /= 2 * k
    d = len(u[0])
    mu = [_normalize([sum(p[i][c] * u[i][j] for i in range(b)) for j in range(d)]) for c in range(k)]
    nu = [_normalize([sum(q[i][c] * v[i][j] for i in range(b)) for j in range(d)]) for c in range(k)]
    center = 0.0
    for c in range(k):
        center += _neg_log_softmax_at([_dot(mu[c], nu[j]) / tau_c for j in range(k)], c)
        center += _neg_log_softmax_at([_dot(nu[c], mu[j]) / tau_c for j in range(k)], c)
    center /= 2 * k
    bal = 0.0
    for c in range(k):
        p_bar = sum(p[i][c] for i in range(b)) / b
        q_bar = sum(q[i][c] for i in range(b)) / b
        bal += w[c] * (p_bar * math.log(max(p_bar, EPS)) + q_bar * math.log(max(q_bar, EPS)))
    terms = {"inst": inst, "assign": assign, "center": center, "bal": bal}
    return alpha * inst + beta * assign + gamma * center + delta * bal, terms


@pytest.mark.parametrize("b,k,d", [(5, 3, 4), (1, 2, 3), (6, 4, 2)])
def test_reference_matches_naive_loops(b, k, d):
    tensors, weights = make_inputs(b, k, d, dtype=torch.float64, seed=b * 100 + k)
    params = dict(tau_assign=0.7, tau_center=0.3, alpha=0.9, beta=1.3, gamma=0.6, delta=2.5)
    loss, terms = reference.consistency_loss(*tensors, balance_weights=weights, **params)
    want_loss, want_terms = naive_consistency_loss([t.tolist() for t in tensors[:4]], [t.tolist() for t in tensors[4:]],
                                                   weights.tolist(), 0.7, 0.3, 0.9, 1.3, 0.6, 2.5)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want_loss, rel=1e-10, abs=1e-12)
    for name in TERMS:
        assert terms[name].item() == pytest.approx(want_terms[name], rel=1e-10, abs=1e-12), name


@pytest.mark.parametrize("b,k,d,fast", [(3, 2, 3, False), (6, 4, 5, True)])
def test_reference_gradcheck(b, k, d, fast):
    """Every input's gradient against finite differences: the full Jacobian on a tiny case, random projections of
    it (gradcheck's fast mode) on a larger one."""
    tensors, weights = make_inputs(b, k, d, dtype=torch.float64, seed=7 + b)
    tensors = [t.requires_grad_(True) for t in tensors]

    def loss_only(*xs):
        return reference.consistency_loss(*xs, balance_weights=weights.double(), alpha=0.7, delta=1.5)[0]

    assert torch.autograd.gradcheck(loss_only, tensors, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


def test_terms_are_detached_and_loss_flows_to_every_input():
    tensors, _ = make_inputs(6, 4, 8, seed=3)
    tensors = [t.requires_grad_(True) for t in tensors]
    loss, terms = consistency_loss(*tensors)
    assert set(terms) == set(TERMS)
    assert all(not t.requires_grad for t in terms.values())
    loss.backward()
    for t in tensors:
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and t.grad.abs().sum() > 0


def test_numpy_scalar_weights_are_numbers():
    # np.float32(1.0) was refused as "not a finite number" while tau_assign took it.
    import numpy as np

    tensors, _ = make_inputs(5, 3, 4, seed=2)
    plain, _ = consistency_loss(*tensors, alpha=0.5, beta=2, delta=1.5)
    numpy_weights, _ = consistency_loss(*tensors, alpha=np.float32(0.5), beta=np.int64(2), delta=np.float64(1.5))
    torch.testing.assert_close(numpy_weights, plain)


def test_defaults_are_the_documented_weights():
    tensors, _ = make_inputs(7, 3, 4, dtype=torch.float64, seed=11)
    loss, terms = consistency_loss(*tensors)
    expected = terms["inst"] + terms["assign"] + terms["center"] + 5.0 * terms["bal"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_default_temperatures_and_weights_are_the_documented_ones():
    """Every default (tau_assign = tau_center = 0.5, alpha = beta = gamma = 1, delta = 5, balance weights of one)
    against the naive loops given those values: the test above takes the terms from the call it checks."""
    tensors, _ = make_inputs(6, 3, 4, dtype=torch.float64, seed=13)
    want_loss, want_terms = naive_consistency_loss([t.tolist() for t in tensors[:4]], [t.tolist() for t in tensors[4:]],
                                                   [1.0] * 3, 0.5, 0.5, 1.0, 1.0, 1.0, 5.0)
    # The op's defaults, and the reference's own (it defines the op: called directly, it must mean the same loss).
    for loss, terms in (consistency_loss(*tensors), reference.consistency_loss(*tensors)):
        assert loss.item() == pytest.approx(want_loss, rel=1e-10, abs=1e-12)
        for name in TERMS:
            assert terms[name].item() == pytest.approx(want_terms[name], rel=1e-10, abs=1e-12), name


# ---------------------------------------------------------------------------------------------------------------------
# The Triton kernel (forced; on the CPU through the interpreter) against the reference run in float64

PARAMS = dict(tau_assign=0.7, tau_center=0.3, alpha=0.9, beta=1.3, gamma=0.6, delta=2.5)
RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}

# The interpreter runs one program at a time: on the CPU a subset with odd sizes that still takes several row blocks,
# row splits, K tiles (K = 100 > 64) and D tiles (D = 512 > 128); on CUDA the whole grid of the issue.
CPU_SHAPES = [(1, 2, 16), (7, 10, 16), (130, 100, 16), (7, 100, 512), (1031, 2, 16)]
CUDA_SHAPES = [(b, k, d) for b in (1, 7, 300, 1031) for k in (2, 10, 100) for d in (16, 512)]
SHAPE_CASES = ([pytest.param("cpu", s, id=f"cpu-B{s[0]}-K{s[1]}-D{s[2]}") for s in CPU_SHAPES]
               + [pytest.param("cuda", s, id=f"cuda-B{s[0]}-K{s[1]}-D{s[2]}") for s in CUDA_SHAPES
                  if torch.cuda.is_available()])


def run_backend(backend, tensors, weights, **params):
    """(loss, terms, grads) of the public op on ``backend``, on fresh leaf copies of ``tensors``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    with laic_kernels.use_backend(backend):
        loss, terms = consistency_loss(*leaves, balance_weights=weights, **params)
    loss.backward()
    return loss.detach(), terms, [t.grad for t in leaves]


def assert_matches_float64_reference(tensors, weights, rtol, backend="triton", **params):
    loss, terms, grads = run_backend(backend, tensors, weights, **params)
    want_loss, want_terms, want_grads = run_backend("reference", [t.double() for t in tensors], weights.double(),
                                                    **params)
    assert loss.dtype == torch.promote_types(tensors[0].dtype, torch.float32) and bool(torch.isfinite(loss))
    for name in TERMS:
        assert terms[name].item() == pytest.approx(want_terms[name].item(), rel=rtol, abs=rtol * 1e-3), name
    # The loss is a signed sum (the balance term is negative): its error is relative to the size of its parts.
    weights_of = dict(inst=params["alpha"], assign=params["beta"], center=params["gamma"], bal=params["delta"])
    scale = sum(abs(weights_of[n] * want_terms[n].item()) for n in TERMS)
    assert abs(loss.item() - want_loss.item()) <= rtol * scale
    names = ("img_logits", "txt_logits", "img_nbr_logits", "txt_nbr_logits", "img_feats", "txt_feats")
    for name, grad, want, t in zip(names, grads, want_grads, tensors):
        assert grad.dtype == t.dtype and grad.shape == t.shape, name
        error = (grad.double() - want).norm().item()
        # Norm-wise relative error; the small absolute floor covers gradients that vanish exactly (B = 1 features),
        # where float32 leaves the rounding of O(1) terms that cancel: up to 7.1e-7 from the Triton kernel on an H200
        # (2026-12-04), so the floor is rtol * 1e-2 (1e-6 in float32), far below any non-vanishing gradient's norm.
        assert error <= rtol * want.norm().item() + rtol * 1e-2, f"{name}: error {error:.3g}, norm {want.norm():.3g}"


@pytest.mark.parametrize("device,shape", SHAPE_CASES)
def test_kernel_float32_matches_reference(device, shape):
    b, k, d = shape
    tensors, weights = make_inputs(b, k, d, device=device, seed=b + 7 * k + 13 * d)
    assert_matches_float64_reference(tensors, weights, RTOL[torch.float32], **PARAMS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_inputs_match_reference(device, dtype):
    shapes = [(130, 100, 40)] if device.type == "cpu" else CUDA_SHAPES
    for seed, (b, k, d) in enumerate(shapes if dtype == torch.bfloat16 else shapes[:1]):
        tensors, weights = make_inputs(b, k, d, dtype=dtype, device=device, seed=100 + seed)
        assert_matches_float64_reference(tensors, weights, RTOL[dtype], **PARAMS)


@pytest.mark.parametrize("low", [-20.0, -50.0])
def test_kernel_empty_cluster(device, low):
    """No sample picks cluster 0 (its column norms fall below eps: the clamped branches of the norms)."""
    tensors, weights = make_inputs(33, 10, 16, device=device, seed=5)
    for t in tensors[:4]:
        t[:, 0] = low
    assert_matches_float64_reference(tensors, weights, RTOL[torch.float32], **PARAMS)


def test_kernel_logits_up_to_50(device):
    tensors, weights = make_inputs(40, 10, 24, device=device, seed=9, scale=50.0)
    assert_matches_float64_reference(tensors, weights, RTOL[torch.float32], **PARAMS)


@pytest.mark.parametrize("offset", [1e4, -1e6])
def test_kernel_logits_far_from_zero(device, offset):
    """Softmax ignores a common offset; the kernel's rebuilt P must too (it once kept max + log(sum) in one float32,
    which lost log(sum) near 1e4: gradients off by 2e-3 relative)."""
    tensors, weights = make_inputs(40, 10, 24, device=device, seed=11)
    shifted = [t + offset for t in tensors[:4]] + tensors[4:]
    assert_matches_float64_reference(shifted, weights, RTOL[torch.float32], **PARAMS)


def test_kernel_rows_of_equal_huge_logits_are_uniform(device):
    """Every logit 1e30: P and Q are uniform (the instance term is log K), as the reference gives."""
    tensors, weights = make_inputs(20, 6, 16, device=device, seed=12)
    tensors = [torch.full_like(t, 1e30) for t in tensors[:4]] + tensors[4:]
    assert_matches_float64_reference(tensors, weights, RTOL[torch.float32], **PARAMS)


def test_kernel_default_weights_and_no_balance_weights(device):
    tensors, _ = make_inputs(9, 3, 16, device=device, seed=4)
    loss, terms, grads = run_backend("triton", tensors, None)
    want_loss, want_terms, want_grads = run_backend("reference", [t.double() for t in tensors], None)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-4)
    for grad, want in zip(grads, want_grads):
        assert (grad.double() - want).norm() <= 1e-4 * want.norm() + 1e-7


def test_kernel_strided_and_mixed_dtype_inputs(device):
    """Column slices of wider tensors (non-contiguous rows) and logits in bfloat16 beside float32 features."""
    tensors, weights = make_inputs(21, 12, 40, device=device, seed=15)
    wide = [torch.cat([t, t[:, :3]], dim=1)[:, :t.shape[1]] for t in tensors]
    assert not wide[0].is_contiguous()
    assert_matches_float64_reference(wide, weights, RTOL[torch.float32], **PARAMS)
    mixed = [t.bfloat16() for t in tensors[:4]] + tensors[4:]
    assert_matches_float64_reference(mixed, weights, RTOL[torch.bfloat16], **PARAMS)


def test_kernel_with_fixed_features(device):
    """Features that do not require grad (fixed embeddings): the logit gradients are unchanged and the feature
    gradients are skipped."""
    tensors, weights = make_inputs(19, 6, 24, device=device, seed=17)
    logits = [t.clone().requires_grad_(True) for t in tensors[:4]]
    with laic_kernels.use_backend("triton"):
        loss, _ = consistency_loss(*logits, *tensors[4:], balance_weights=weights, **PARAMS)
    loss.backward()
    _, _, want_grads = run_backend("reference", [t.double() for t in tensors], weights.double(), **PARAMS)
    for grad, want in zip([t.grad for t in logits], want_grads):
        assert (grad.double() - want).norm() <= 1e-4 * want.norm()
    assert tensors[4].grad is None and tensors[5].grad is None


def test_kernel_with_only_the_text_features_trained(device):
    """Image features fixed, text features trained: the text features' gradient is the reference's (a mutation
    that took the feature gradients from the image side alone returned an empty one, unnoticed)."""
    tensors, weights = make_inputs(7, 10, 16, device=device, seed=23)
    txt_feats = tensors[5].clone().requires_grad_(True)
    with laic_kernels.use_backend("triton"):
        loss, _ = consistency_loss(*tensors[:5], txt_feats, balance_weights=weights, **PARAMS)
    loss.backward()
    _, _, want_grads = run_backend("reference", [t.double() for t in tensors], weights.double(), **PARAMS)
    assert txt_feats.grad.shape == txt_feats.shape
    assert (txt_feats.grad.double() - want_grads[5]).norm() <= 1e-4 * want_grads[5].norm()


@pytest.mark.parametrize("backend", ["closed_form", "triton"])
def test_a_negative_balance_weight_is_differentiated_as_the_reference_does(backend, device):
    # delta < 0 is accepted; the closed form's balance gradient ran for delta > 0 only under a mutation, unnoticed.
    if backend == "triton" and device.type == "cpu" and not __import__("os").environ.get("TRITON_INTERPRET"):
        pytest.skip("the Triton kernel needs a GPU or the interpreter")
    tensors, weights = make_inputs(13, 6, 8, dtype=torch.float64 if backend == "closed_form" else torch.float32,
                                   device=device, seed=29)
    assert_matches_float64_reference(tensors, weights, 1e-4, backend=backend, **dict(PARAMS, delta=-1.0))


def test_kernel_writes_every_element_of_its_buffers(device, monkeypatch):
    """Every buffer the launchers allocate (partial sums, row statistics, gradients) starts as NaN here, so an element
    a kernel fails to write cannot pass the comparison with the reference."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    tensors, weights = make_inputs(37, 11, 19, device=device, seed=23)
    assert_matches_float64_reference(tensors, weights, RTOL[torch.float32], **PARAMS)
    half = [t.bfloat16() for t in tensors]
    assert_matches_float64_reference(half, weights, RTOL[torch.bfloat16], **PARAMS)


def test_kernel_is_deterministic(device):
    """Two runs on the same inputs are bitwise equal (several row blocks and row splits, so partial sums)."""
    b = 300 if device.type == "cpu" else 8192
    tensors, weights = make_inputs(b, 10, 16, device=device, seed=2)
    first = run_backend("triton", tensors, weights, **PARAMS)
    second = run_backend("triton", tensors, weights, **PARAMS)
    assert torch.equal(first[0], second[0])
    for name in TERMS:
        assert torch.equal(first[1][name], second[1][name])
    for a, b_ in zip(first[2], second[2]):
        assert torch.equal(a, b_)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the CUDA tile sizes run for real")
def test_cuda_tile_sizes_on_the_interpreter(monkeypatch):
    """The tile sizes CUDA uses (smaller than the interpreter's: 32-row blocks, 16-wide contraction tiles, 32-wide
    feature tiles) run here through the interpreter, so that their tiling is checked without a GPU."""
    kernel = pytest.importorskip("laic_kernels.triton.consistency_loss")
    monkeypatch.setattr(kernel, "interpreter_blocks", kernel.cuda_blocks)
    tensors, weights = make_inputs(45, 20, 40, seed=21)
    assert_matches_float64_reference(tensors, weights, RTOL[torch.float32], **PARAMS)


def test_triton_second_derivatives_are_the_references():
    """create_graph=True on the Triton backend (CUDA's first choice) differentiates the reference, as the closed
    forms do: before, the second backward raised torch's "no autograd formula was registered" for
    laic.consistency_loss_backward."""
    pytest.importorskip("laic_kernels.triton.consistency_loss")
    tensors, weights = make_inputs(9, 5, 6, seed=23)
    logits = [t.requires_grad_(True) for t in tensors[:4]]
    feats = [t.requires_grad_(True) for t in tensors[4:]]
    directions = [torch.randn_like(t) for t in logits]

    def hessian_vector(backend):
        with laic_kernels.use_backend(backend):
            loss, _ = consistency_loss(*logits, *feats, balance_weights=weights, **PARAMS)
        grads = torch.autograd.grad(loss, logits, create_graph=True)
        return grads + torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, directions)), logits + feats)

    for got, want in zip(hessian_vector("triton"), hessian_vector("reference")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_triton_leaves_autocast_and_torch_func_to_the_reference():
    """Inside torch.func.grad the Triton backend (forced here, as CUDA chooses it) took the input and failed in
    torch's functorch machinery; it now says why not, like the closed forms, and in automatic mode the op falls to
    the reference."""
    pytest.importorskip("laic_kernels.triton.consistency_loss")
    tensors, weights = make_inputs(8, 4, 6, seed=29)

    def loss_of(x):
        return consistency_loss(x, *tensors[1:], balance_weights=weights)[0]

    with laic_kernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match="forced backend .triton. cannot take this input: inside a torch.func"):
            torch.func.grad(loss_of)(tensors[0])
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast is on"):
            loss_of(tensors[0])
    torch.testing.assert_close(torch.func.grad(loss_of)(tensors[0]), run_backend("reference", tensors, weights)[2][0])


def test_triton_balance_weights_take_no_gradient():
    """balance_weights are set by the trainer, not learnt: every backend detaches them. Triton's did not (a loss that
    required grad through them alone, whose backward then left their .grad None without a word)."""
    pytest.importorskip("laic_kernels.triton.consistency_loss")
    tensors, weights = make_inputs(6, 3, 5, seed=31)
    for backend in ("triton", "reference"):
        with laic_kernels.use_backend(backend):
            loss, _ = consistency_loss(*tensors, balance_weights=weights.clone().requires_grad_(True))
        assert not loss.requires_grad, backend


def test_custom_op_registration_and_torch_compile():
    """The kernels are the custom ops laic::consistency_loss_forward/_backward: torch.library's own checks (schema,
    fake tensors, autograd registration) pass, and torch.compile traces them in one graph with the same result."""
    kernel = pytest.importorskip("laic_kernels.triton.consistency_loss")
    tensors, weights = make_inputs(5, 3, 16, seed=12)
    tensors = [t.requires_grad_(True) for t in tensors]
    args = (*tensors, weights, 0.5, 0.5, 1.0, 1.0, 1.0, 5.0)
    torch.library.opcheck(torch.ops.laic.consistency_loss_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def loss_of(*xs):
        return kernel.consistency_loss(*xs, balance_weights=weights, **PARAMS)[0]

    eager = loss_of(*tensors)
    eager_grads = torch.autograd.grad(eager, tensors)
    compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=True)(*tensors)
    compiled_grads = torch.autograd.grad(compiled, tensors)
    assert torch.equal(eager, compiled)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)


# Run in a fresh interpreter without TRITON_INTERPRET (under it, triton.jit gives Python functions, not kernels).
_COMPILE_FOR_SM90 = r"""
import json, os, re, subprocess, sys, tempfile
import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from laic_kernels.triton import consistency_loss as kernel

tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
constants = dict(kernel.cuda_blocks(8192, 1000, 512), PRECISION="tf32x3")
launches = {"row_stats": kernel._row_stats_kernel, "reduce": kernel._reduce_kernel,
            "products": kernel._backward_products_kernel, "softmax": kernel._backward_softmax_kernel}
report = {}
for options, fn in launches.items():
    signature = {p.name: "constexpr" if p.is_constexpr else "*fp32" if p.name.endswith("_ptr") else "i32"
                 for p in fn.params}
    constexprs = {p.name: constants[p.name] for p in fn.params if p.is_constexpr}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=kernel.LAUNCH_OPTIONS[options])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    report[fn.__name__] = {key: int(re.search(key + r":(\d+)", usage).group(1)) for key in ("REG", "STACK")}
print(json.dumps(report))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels are compiled and run for real")
def test_kernels_compile_for_sm90_without_register_spills():
    """The interpreter accepts code that the GPU compiler rejects: compile every kernel ahead of time for sm_90 (as
    launched on CUDA: tile sizes, tf32x3 dots, warps and stages) and check that no thread spills registers."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("Triton's ptxas is not installed: cannot compile for the GPU here")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 4
    for name, usage in report.items():
        assert usage["STACK"] == 0, f"{name} spills {usage['STACK']} bytes per thread ({usage['REG']} registers)"


def test_automatic_dispatch_and_float64():
    """On the CPU the automatic choice is a closed-form backend, the compiled kernel where the extension is built
    (one node in the graph either way); float64 cannot be forced onto the Triton kernel."""
    tensors, weights = make_inputs(5, 3, 4, dtype=torch.float64, seed=1)
    explained = laic_kernels.backends.explain("consistency_loss", *tensors, balance_weights=weights)
    assert explained["closed_form"] is None and explained["reference"] is None and explained["triton"] is not None
    assert (explained["extension"] is None) == (extension_import_error() is None)
    loss, _ = consistency_loss(*[t.clone().requires_grad_(True) for t in tensors], balance_weights=weights)
    node = "_ConsistencyLossBackward" if extension_import_error() else "_CompiledConsistencyLossBackward"
    assert graph_node_names(loss) == {node, "AccumulateGrad"}
    with laic_kernels.use_backend("reference"):
        loss, _ = consistency_loss(*[t.clone().requires_grad_(True) for t in tensors], balance_weights=weights)
    assert "_ConsistencyLossBackward" not in graph_node_names(loss)
    with laic_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        consistency_loss(*tensors)


def graph_node_names(tensor):
    """The class names of every node of ``tensor``'s autograd graph."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


# ---------------------------------------------------------------------------------------------------------------------
# The closed-form backend (the reference with its gradient written out) and the compiled CPU kernel of the same
# closed form ('extension') against the reference

CLOSED_FORM_SHAPES = [(1, 2, 3), (7, 10, 16), (130, 100, 16), (33, 47, 512), (257, 1000, 8)]


@pytest.fixture(params=["closed_form", "extension"])
def closed_backend(request):
    """The two backends that compute the closed form: in Python ops, and in the compiled CPU kernel (forced, so at
    any K; skipped where the extension is not built)."""
    if request.param == "extension" and extension_import_error():
        pytest.skip(f"extension not built: {extension_import_error()}")
    return request.param


@pytest.mark.parametrize("shape", CLOSED_FORM_SHAPES, ids=lambda s: "B{}-K{}-D{}".format(*s))
def test_closed_form_float32_matches_float64_reference(shape, closed_backend):
    b, k, d = shape
    tensors, weights = make_inputs(b, k, d, seed=3 * b + k + d)
    assert_matches_float64_reference(tensors, weights, RTOL[torch.float32], backend=closed_backend, **PARAMS)


@pytest.mark.parametrize("shape", CLOSED_FORM_SHAPES[:4], ids=lambda s: "B{}-K{}-D{}".format(*s))
def test_closed_form_float64_equals_reference(shape, closed_backend):
    """In float64 both forms agree to rounding: a wrong gradient formula cannot hide behind float32 tolerances."""
    b, k, d = shape
    tensors, weights = make_inputs(b, k, d, dtype=torch.float64, seed=5 * b + k)
    assert_matches_float64_reference(tensors, weights.double(), 1e-10, backend=closed_backend, **PARAMS)


@pytest.mark.parametrize("low", [-20.0, -50.0])
def test_closed_form_empty_cluster(low, closed_backend):
    """Cluster 0 picked by no sample: at -50 its columns' norms fall below eps (the clamped branch of the
    normalisation's gradient)."""
    tensors, weights = make_inputs(33, 10, 16, dtype=torch.float64, seed=5)
    for t in tensors[:4]:
        t[:, 0] = low
    assert_matches_float64_reference(tensors, weights.double(), 1e-10, backend=closed_backend, **PARAMS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_closed_form_half_inputs(dtype, closed_backend):
    """Half-precision inputs: float32 math, gradients in the inputs' dtype."""
    tensors, weights = make_inputs(130, 10, 40, dtype=dtype, seed=31)
    assert_matches_float64_reference(tensors, weights, RTOL[dtype], backend=closed_backend, **PARAMS)


@pytest.mark.parametrize("delta,weighted", [(0.0, False), (2.5, False), (2.5, True)])
def test_closed_form_as_stage1_calls_it(delta, weighted, closed_backend):
    """Features without gradients (stage 1's are fixed), the balance term off (delta = 0, stage 1's default) or on,
    with the default balance weights (stage 1 passes none) or given ones: the logits' gradients are the
    reference's."""
    tensors, weights = make_inputs(257, 10, 64, seed=37)
    params = dict(PARAMS, delta=delta)
    grads = {}
    for backend in (closed_backend, "reference"):
        logits = [t.double().clone().requires_grad_(True) for t in tensors[:4]]
        feats = [t.double() for t in tensors[4:]]
        with laic_kernels.use_backend(backend):
            loss, terms = consistency_loss(*logits, *feats, balance_weights=weights.double() if weighted else None,
                                           **params)
        loss.backward()
        grads[backend] = [x.grad for x in logits], terms
    (got, got_terms), (want, want_terms) = grads[closed_backend], grads["reference"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    for name in TERMS:   # the balance term is reported even where it weighs nothing
        torch.testing.assert_close(got_terms[name], want_terms[name], rtol=1e-10, atol=1e-14)


def test_closed_form_retained_graph_gives_the_same_gradient_twice(closed_backend):
    """The backward reads the forward's saved values without changing them: a second backward of a retained graph
    adds the same gradient again."""
    tensors, weights = make_inputs(33, 10, 16, dtype=torch.float64, seed=41)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    with laic_kernels.use_backend(closed_backend):
        loss, _ = consistency_loss(*leaves, balance_weights=weights.double(), **PARAMS)
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in leaves]
    loss.backward()
    for x, g in zip(leaves, first):
        torch.testing.assert_close(x.grad, 2 * g, rtol=1e-12, atol=0)


def test_closed_form_gradcheck(closed_backend):
    tensors, weights = make_inputs(6, 4, 5, dtype=torch.float64, seed=21)
    tensors = [t.requires_grad_(True) for t in tensors]

    def loss_only(*xs):
        with laic_kernels.use_backend(closed_backend):
            return consistency_loss(*xs, balance_weights=weights.double(), alpha=0.7, delta=1.5)[0]

    assert torch.autograd.gradcheck(loss_only, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_closed_form_second_derivatives_are_the_references(closed_backend):
    """A backward with create_graph (a Hessian-vector product) differentiates the reference: the closed form's own
    values carry no graph back to the logits."""
    tensors, weights = make_inputs(9, 5, 6, dtype=torch.float64, seed=23)
    logits = [t.requires_grad_(True) for t in tensors[:4]]
    directions = [torch.randn_like(t) for t in logits]

    def hessian_vector(backend):
        with laic_kernels.use_backend(backend):
            loss, _ = consistency_loss(*logits, *tensors[4:], balance_weights=weights.double(), **PARAMS)
        grads = torch.autograd.grad(loss, logits, create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, directions)), logits)

    for got, want in zip(hessian_vector(closed_backend), hessian_vector("reference")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_closed_form_second_derivatives_with_one_tensor_in_two_places(closed_backend):
    """The same logits passed as a row's and as its neighbour's: a backward with create_graph gives each place its
    own gradient (their sum is the tensor's), so first and second derivatives are the reference's."""
    tensors, weights = make_inputs(9, 5, 6, dtype=torch.float64, seed=43)
    p, q = (t.requires_grad_(True) for t in tensors[:2])
    directions = [torch.randn_like(t) for t in (p, q)]

    def derivatives(backend):
        with laic_kernels.use_backend(backend):
            loss, _ = consistency_loss(p, q, p, q, *tensors[4:], balance_weights=weights.double(), **PARAMS)
        grads = torch.autograd.grad(loss, (p, q), create_graph=True)
        return grads + torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, directions)), (p, q))

    for got, want in zip(derivatives(closed_backend), derivatives("reference")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_closed_form_leaves_autocast_and_torch_func_to_the_reference(closed_backend):
    tensors, weights = make_inputs(8, 4, 6, seed=29)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reasons = laic_kernels.backends.explain("consistency_loss", *tensors, balance_weights=weights)
        assert "autocast" in reasons[closed_backend] and reasons["reference"] is None
        loss, _ = consistency_loss(*[t.clone().requires_grad_(True) for t in tensors], balance_weights=weights)
        loss.backward()
    grad = torch.func.grad(lambda x: consistency_loss(x, *tensors[1:], balance_weights=weights)[0])(tensors[0])
    _, _, want = run_backend("reference", tensors, weights)
    torch.testing.assert_close(grad, want[0])


needs_extension = pytest.mark.skipif(extension_import_error() is not None,
                                     reason=f"extension not built: {extension_import_error()}")


@needs_extension
@pytest.mark.parametrize("k", [2, 10, closed_form.COMPILED_MAX_CLUSTERS, closed_form.COMPILED_MAX_CLUSTERS + 1])
def test_cpu_takes_the_compiled_kernel_up_to_its_cluster_bound(k):
    """The automatic choice on the CPU: the compiled kernel up to COMPILED_MAX_CLUSTERS clusters, the closed form in
    Python ops above (saying why), whose gradients are the same."""
    tensors, weights = make_inputs(6, k, 5, seed=k)
    explained = laic_kernels.backends.explain("consistency_loss", *tensors, balance_weights=weights)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    loss, _ = consistency_loss(*leaves, balance_weights=weights)
    nodes = graph_node_names(loss)
    if k <= closed_form.COMPILED_MAX_CLUSTERS:
        assert explained["extension"] is None and nodes == {"_CompiledConsistencyLossBackward", "AccumulateGrad"}
    else:
        assert f"K = {k} clusters" in explained["extension"] and explained["closed_form"] is None
        assert nodes == {"_ConsistencyLossBackward", "AccumulateGrad"}


@needs_extension
def test_compiled_kernel_computes_only_the_gradients_asked_for():
    """Logits without gradients and features with them (and the reverse): the op returns empty tensors for what is
    not asked, and what is asked matches the reference."""
    tensors, weights = make_inputs(13, 5, 7, dtype=torch.float64, seed=51)
    _, _, want = run_backend("reference", tensors, weights.double(), **PARAMS)
    for wanted in (range(4), range(4, 6)):
        leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(tensors)]
        with laic_kernels.use_backend("extension"):
            loss, _ = consistency_loss(*leaves, balance_weights=weights.double(), **PARAMS)
        loss.backward()
        for i, leaf in enumerate(leaves):
            if i in wanted:
                torch.testing.assert_close(leaf.grad, want[i], rtol=1e-10, atol=1e-14)
            else:
                assert leaf.grad is None
    op = torch.ops.laic.consistency_loss_with_grads
    params = [PARAMS[n] for n in ("tau_assign", "tau_center", "alpha", "beta", "gamma", "delta")]
    out = op(*tensors, weights.double(), *params, False, True)
    assert [tuple(g.shape) for g in out[2:]] == [(0,)] * 4 + [(13, 7)] * 2


@needs_extension
def test_compiled_kernel_is_asked_for_the_gradients_autograd_can_use(monkeypatch):
    """The flags the autograd Function hands the op: the logits' gradients when a logit requires grad, the
    features' when a feature does (stage 1's fixed features: none), neither under no_grad, where nothing can be
    asked for."""
    op = torch.ops.laic.consistency_loss_with_grads
    flags = []

    def spy(*args):
        flags.append(args[-2:])
        return op(*args)

    monkeypatch.setattr(torch.ops.laic, "consistency_loss_with_grads", spy)
    tensors, weights = make_inputs(9, 4, 6, seed=57)
    with laic_kernels.use_backend("extension"):
        for wanted, expected in (((0, 1, 2, 3), (True, False)), ((4,), (False, True)), (range(6), (True, True)),
                                 ((), (False, False))):
            leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(tensors)]
            consistency_loss(*leaves, balance_weights=weights)
            assert flags[-1] == expected, wanted
            with torch.no_grad():
                consistency_loss(*leaves, balance_weights=weights)
            assert flags[-1] == (False, False), wanted


@needs_extension
@pytest.mark.parametrize("shape", [(1, 2, 3), (37, 11, 19), (256, 10, 512), (5, 3, 70)])
def test_compiled_kernel_writes_every_output_over_poisoned_memory(shape):
    """The kernel's outputs and scratch come from torch's CPU allocator: memory freed just before, full of NaN, is
    what the allocator tends to hand out again, so an element the kernel fails to write shows as NaN. Several rounds,
    odd shapes among them."""
    b, k, d = shape
    tensors, weights = make_inputs(b, k, d, seed=b + k)
    _, _, want = run_backend("reference", [t.double() for t in tensors], weights.double(), **PARAMS)
    for _ in range(3):
        poison = [torch.full((n,), float("nan")) for n in (b * 2 * k, b * k, b * k, k * d, k * d, 4 * k * k, b * d)
                  for _ in range(2)]
        del poison
        loss, terms, grads = run_backend("extension", tensors, weights, **PARAMS)
        assert bool(torch.isfinite(loss)) and all(bool(torch.isfinite(t)) for t in terms.values())
        for grad, w in zip(grads, want):
            assert (grad.double() - w).norm() <= 1e-4 * w.norm() + 1e-7


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_op_registration(dtype):
    """torch.library's own checks of laic::consistency_loss_with_grads: schema, fake (meta) kernel, autograd
    registration (none: the autograd Function wraps it), with every gradient flag."""
    tensors, weights = make_inputs(7, 4, 9, dtype=dtype, seed=53)
    weights = weights.to(dtype)
    op = torch.ops.laic.consistency_loss_with_grads.default
    for logit_grads, feat_grads in ((True, True), (True, False), (False, True), (False, False)):
        torch.library.opcheck(op, (*tensors, weights, 0.5, 0.5, 1.0, 1.0, 1.0, 5.0, logit_grads, feat_grads))


@needs_extension
def test_compiled_op_fake_checks_shapes_and_refuses_a_backward():
    """The fake kernel refuses what the real one does (torch.compile traced a [B, K] gradient from logits of two
    shapes), and a backward through the raw op raises instead of leaving .grad None."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.laic.consistency_loss_with_grads
    tensors, weights = make_inputs(7, 4, 9, seed=59)
    scalars = (0.5, 0.5, 1.0, 1.0, 1.0, 5.0, True, True)
    spoiled = (*tensors[:3], tensors[3][:, :3].contiguous(), *tensors[4:], weights)
    with FakeTensorMode() as fake, pytest.raises(RuntimeError, match="the four logits must have one shape"):
        op(*[fake.from_tensor(t) for t in spoiled], *scalars)
    leaf = tensors[0].clone().requires_grad_(True)
    loss = op(leaf, *tensors[1:], weights, *scalars)[0]
    with pytest.raises(RuntimeError, match="consistency_loss_with_grads has no gradient"):
        loss.backward()


@needs_extension
@pytest.mark.parametrize("spoil,match", [
    (lambda ts, w: (ts[0].double(), *ts[1:], w), "one dtype"),
    (lambda ts, w: (*[t.half() for t in ts], w.half()), "float32 or float64"),
    (lambda ts, w: (ts[0][:, :1], *ts[1:], w), "K >= 2"),
    (lambda ts, w: (*ts[:3], ts[3][:-1], *ts[4:], w), "one shape"),
    (lambda ts, w: (*ts[:4], ts[4][:-1], ts[5], w), "features"),
    (lambda ts, w: (*ts, w[:-1]), "balance_weights"),
])
def test_compiled_op_rejects_bad_input(spoil, match):
    """The op checks its own arguments (the public op converts and checks before it): a wrong call raises, naming
    what is wrong, instead of reading out of bounds."""
    tensors, weights = make_inputs(6, 4, 5, seed=55)
    args = spoil(tensors, weights)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.laic.consistency_loss_with_grads(*args, 0.5, 0.5, 1.0, 1.0, 1.0, 5.0, True, True)


def test_reference_float32_at_a_large_shape():
    """The big shape of the issue on the reference only (the interpreter is too slow for it): float32 within 1e-4
    of float64."""
    tensors, weights = make_inputs(1031, 100, 512, seed=8)
    loss, terms, grads = run_backend("reference", tensors, weights, **PARAMS)
    want_loss, want_terms, want_grads = run_backend("reference", [t.double() for t in tensors], weights.double(),
                                                    **PARAMS)
    for name in TERMS:
        assert terms[name].item() == pytest.approx(want_terms[name].item(), rel=1e-4)
    for grad, want in zip(grads, want_grads):
        assert (grad.double() - want).norm() <= 1e-4 * want.norm()


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def _bad_cases():
    def base():
        tensors, weights = make_inputs(6, 4, 5, seed=1)
        return list(tensors), {}

    def shape_mismatch_k(t, kw):
        t[1] = t[1][:, :3]
        return "txt_logits"

    def shape_mismatch_b(t, kw):
        t[3] = t[3][:5]
        return "txt_nbr_logits"

    def feats_batch(t, kw):
        t[4] = t[4][:5]
        return "img_feats"

    def feats_dim(t, kw):
        t[5] = t[5][:, :4]
        return "txt_feats"

    def one_cluster(t, kw):
        for i in range(4):
            t[i] = t[i][:, :1]
        return "K >= 2"

    def nan_logits(t, kw):
        t[2] = t[2].clone()
        t[2][1, 2] = float("nan")
        return "img_nbr_logits"

    def inf_feats(t, kw):
        t[4] = t[4].clone()
        t[4][0, 0] = float("inf")
        return "img_feats"

    def huge_feats(t, kw):     # finite, but the centres' squared norms overflow float32 (a wrong loss before)
        t[5] = t[5] * 1e20
        return "txt_feats reaches .* in magnitude: the centres .* overflow float32"

    def huge_float64_feats(t, kw):
        t[:] = [x.double() for x in t]
        t[4] = t[4] * 1e160
        return "img_feats reaches .* overflow float64"

    def weights_shape(t, kw):
        kw["balance_weights"] = torch.ones(5)
        return "balance_weights"

    def weights_nan(t, kw):
        kw["balance_weights"] = torch.tensor([1.0, float("nan"), 1.0, 1.0])
        return "balance_weights"

    def one_dim(t, kw):
        t[0] = t[0][0]
        return "img_logits"

    def int_logits(t, kw):
        t[0] = t[0].long()
        return "img_logits"

    def bad_tau(t, kw):
        kw["tau_assign"] = 0.0
        return "tau_assign"

    def bad_weight(t, kw):
        kw["gamma"] = float("nan")
        return "gamma"

    def empty_batch(t, kw):
        t[:] = [x[:0] for x in t]
        return "img_logits"

    def tiny_tau(t, kw):   # a NaN loss and NaN gradients on every backend before
        kw["tau_center"] = 1e-39
        return "tau_center = 1e-39 is too small: 1 / tau_center must be a finite torch.float32"

    def huge_weight(t, kw):   # an infinite loss before
        kw["alpha"] = 1e39
        return "alpha = 1e[+]39 must be a finite torch.float32 weight"

    cases = [shape_mismatch_k, shape_mismatch_b, feats_batch, feats_dim, one_cluster, nan_logits, inf_feats,
             huge_feats, huge_float64_feats, weights_shape, weights_nan, one_dim, int_logits, bad_tau, bad_weight,
             empty_batch, tiny_tau, huge_weight]
    return [pytest.param(base, c, id=c.__name__) for c in cases]


def test_float64_features_beyond_float32_are_computed_not_refused():
    """The centres' overflow check takes the computation's dtype: float64 features of 1e20 (exact on the float64
    backends) are computed, and a common scale leaves the loss as it was."""
    tensors, weights = make_inputs(6, 3, 5, dtype=torch.float64, seed=61)
    loss, _ = consistency_loss(*tensors, balance_weights=weights.double())
    scaled, _ = consistency_loss(*tensors[:4], tensors[4] * 1e20, tensors[5] * 1e20, balance_weights=weights.double())
    torch.testing.assert_close(scaled, loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("base,spoil", _bad_cases())
def test_bad_input_raises_value_error_naming_it(base, spoil):
    tensors, kwargs = base()
    needle = spoil(tensors, kwargs)
    with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
        consistency_loss(*tensors, **kwargs)
