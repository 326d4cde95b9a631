"""Every Triton op launches on its inputs' device: Triton launches on torch's current CUDA device, not on the
tensors', so each custom op's body enters ``laic_kernels.backends.on_device`` (``LAIC(device="cuda:1")`` in one
process would otherwise hand cuda:0 kernels cuda:1 pointers). The Sinkhorn extension has its own ``CUDAGuard``."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import laic_kernels
from laic_kernels import backends, reference


def op_outputs(backend, x, t, logits, feats):
    """Each op once on ``backend``: similarity_topk, semantic_mix and consistent_neighbours' outputs, and the
    consistency loss's gradient of the first logits (its forward and backward)."""
    logits = [lg.detach().clone().requires_grad_(True) for lg in logits]
    with laic_kernels.use_backend(backend):
        out = {"similarity_topk": laic_kernels.similarity_topk(x, t, 3)[0],
               "semantic_mix": laic_kernels.semantic_mix(x, t, 0.1),
               "consistent_neighbours": laic_kernels.consistent_neighbours(x, t, 4)[0]}
        loss, _ = laic_kernels.consistency_loss(*logits, *feats)
    loss.backward()
    out["consistency_loss"] = logits[0].grad
    return out


def run_every_triton_op(device):
    """Each Triton op once on small inputs of ``device``, the consistency loss with its backward; returns each op's
    output beside the reference's."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(40, 16, generator=g), dim=1).to(device)
    t = F.normalize(torch.randn(40, 16, generator=g), dim=1).to(device)
    logits = [torch.randn(12, 5, generator=g).to(device) for _ in range(4)]
    feats = [torch.randn(12, 16, generator=g).to(device) for _ in range(2)]
    return op_outputs("triton", x, t, logits, feats), op_outputs("reference", x, t, logits, feats)


def test_every_triton_op_enters_its_inputs_device(device, monkeypatch):
    entered = []
    real = backends.on_device
    monkeypatch.setattr(backends, "on_device", lambda d: entered.append(d) or real(d))
    out, want = run_every_triton_op(device)
    # similarity_topk, semantic_mix (its own top-k runs inside it), consistent_neighbours, the loss and its backward.
    assert len(entered) >= 5 and all(d == out["similarity_topk"].device for d in entered), entered
    for name in out:
        torch.testing.assert_close(out[name].float(), want[name].float(), atol=1e-4, rtol=1e-4, msg=name)


def test_on_device_guards_cuda_devices_only():
    guard = backends.on_device(torch.device("cuda", 1))      # made, not entered: no second GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(backends.on_device(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_every_triton_op_runs_on_a_gpu_that_is_not_current():
    torch.cuda.set_device(0)
    out, want = run_every_triton_op(torch.device("cuda", 1))
    for name in out:
        assert out[name].device == torch.device("cuda", 1)
        torch.testing.assert_close(out[name].float(), want[name].float(), atol=1e-3, rtol=1e-3, msg=name)
