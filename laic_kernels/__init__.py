"""laic_kernels: the fused kernels behind laic, each with a pure-PyTorch reference that defines it.

Public ops (inputs are checked; the backend is chosen by device and availability, see ``laic_kernels.backends``):
  similarity_topk   k largest dot products per query, streaming over keys
  semantic_mix      softmax mixture of nouns per image (the text counterpart)
  consistency_loss  the stage-1 cross-modal consistency loss
  sinkhorn          batched log-domain Sinkhorn-Knopp balancing
"""
from . import reference
from .backends import BACKENDS, forced_backend, use_backend
from .consistency_loss import consistency_loss
from .semantic_mix import semantic_mix
from .similarity_topk import similarity_topk
from .sinkhorn import sinkhorn

__all__ = ["similarity_topk", "semantic_mix", "consistency_loss", "sinkhorn", "use_backend", "forced_backend",
           "BACKENDS", "reference"]
