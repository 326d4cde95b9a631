"""Triton kernel for semantic_mix: not written yet (see its issue)."""


def why_not(*args, **kwargs):
    return "the Triton kernel for semantic_mix is not written yet"
