"""consistency_loss: the stage-1 cross-modal consistency loss (defined by its own issue)."""
from __future__ import annotations

from . import reference


def consistency_loss(*args, **kwargs):
    return reference.consistency_loss(*args, **kwargs)
