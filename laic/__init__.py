"""laic: language-assisted image clustering.

The pipeline, in the order it runs:
  laic.embed    image embeddings with open_clip (cached on disk)
  laic.vocab    the noun vocabulary and its text embeddings
  laic.stage0   the semantic space: k-means, noun filtering, text counterparts, neighbour graphs
  laic.stage1   cross-modal semantic consistency: the clustering heads
  laic.model    the LAIC estimator (fit / predict / save / load)
  laic.stage2   self-enhancement: fine-tuning the vision encoder on confident pseudo-labels
  laic.metrics  ACC (Hungarian), NMI, ARI
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import laic` stays cheap, and laic.metrics works without the rest of the pipeline.
    if name == "LAIC":
        from .model import LAIC
        return LAIC
    raise AttributeError(f"module 'laic' has no attribute {name!r}")
