"""Triton kernel for consistency_loss: not written yet (see its issue)."""


def why_not(*args, **kwargs):
    return "the Triton kernel for consistency_loss is not written yet"
