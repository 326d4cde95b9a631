"""Pure-PyTorch references: each function here defines the semantics of the public op of the same name.

They take already-validated inputs (the public ops in ``laic_kernels`` check them) and never build an N×M matrix at
once: they work in chunks of query rows.
"""
from .similarity_topk import similarity_topk
from .semantic_mix import semantic_mix
from .sinkhorn import sinkhorn
from .consistency_loss import consistency_loss
from .consistent_neighbours import consistent_neighbours

__all__ = ["similarity_topk", "semantic_mix", "sinkhorn", "consistency_loss", "consistent_neighbours"]
