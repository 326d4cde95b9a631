"""laic_kernels: the fused kernels behind laic, each with a pure-PyTorch reference that defines it.

Public ops (inputs are checked; the backend is chosen by device and availability, see ``laic_kernels.backends``):
  similarity_topk   k largest dot products per query, streaming over keys
  semantic_mix      softmax mixture of nouns per image (the text counterpart)
  consistency_loss  the stage-1 cross-modal consistency loss
  sinkhorn          batched log-domain Sinkhorn-Knopp balancing
  knn_graph         exact cosine k nearest neighbours (self excluded), built on similarity_topk
  consistent_neighbours  image-space neighbours the text space agrees with (padded indices + mask)
"""
from . import reference
from .backends import BACKENDS, forced_backend, use_backend
from .consistency_loss import consistency_loss
from .consistent_neighbours import consistent_neighbours
from .knn_graph import knn_graph
from .semantic_mix import semantic_mix
from .similarity_topk import similarity_topk
from .sinkhorn import sinkhorn

__all__ = ["similarity_topk", "semantic_mix", "consistency_loss", "sinkhorn", "knn_graph", "consistent_neighbours",
           "use_backend", "forced_backend", "BACKENDS", "reference"]
