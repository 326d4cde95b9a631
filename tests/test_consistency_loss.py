"""consistency_loss: the reference against a naive loop-by-loop computation of the definition and gradcheck; the Triton
kernel (interpreter on CPU, CUDA when present) against the reference run in float64; input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

import laic_kernels
from laic_kernels import consistency_loss, reference

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


def test_reference_gradcheck():
    tensors, weights = make_inputs(4, 3, 5, dtype=torch.float64, seed=7)
    tensors = [t.requires_grad_(True) for t in tensors]

    def loss_only(*xs):
        return reference.consistency_loss(*xs, balance_weights=weights.double(), alpha=0.7, delta=1.5)[0]

    assert torch.autograd.gradcheck(loss_only, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_terms_are_detached_and_loss_flows_to_every_input():
    tensors, _ = make_inputs(6, 4, 8, seed=3)
    tensors = [t.requires_grad_(True) for t in tensors]
    loss, terms = consistency_loss(*tensors)
    assert set(terms) == set(TERMS)
    assert all(not t.requires_grad for t in terms.values())
    loss.backward()
    for t in tensors:
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and t.grad.abs().sum() > 0


def test_defaults_are_the_documented_weights():
    tensors, _ = make_inputs(7, 3, 4, dtype=torch.float64, seed=11)
    loss, terms = consistency_loss(*tensors)
    expected = terms["inst"] + terms["assign"] + terms["center"] + 5.0 * terms["bal"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


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

    cases = [shape_mismatch_k, shape_mismatch_b, feats_batch, feats_dim, one_cluster, nan_logits, inf_feats,
             weights_shape, weights_nan, one_dim, int_logits, bad_tau, bad_weight, empty_batch]
    return [pytest.param(base, c, id=c.__name__) for c in cases]


@pytest.mark.parametrize("base,spoil", _bad_cases())
def test_bad_input_raises_value_error_naming_it(base, spoil):
    tensors, kwargs = base()
    needle = spoil(tensors, kwargs)
    with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
        consistency_loss(*tensors, **kwargs)
