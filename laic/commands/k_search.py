"""`laic fit`'s K options (--k N | auto, --k-range LO:HI) as LAIC's, and what the run says of a search of K
(laic.select_k): the curve printed, and run.json's "k_search"."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

from ..select_k import AUTO, MIN_K, KSelection, check_k_range, doubts, format_scores


def parse_k_range(text: str, flag: str = "--k-range") -> Tuple[int, int]:
    """``"LO:HI"`` -> ``(LO, HI)`` (checked against N later, by :func:`check_k_range`)."""
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(lo), int(hi)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected LO:HI with two integers, e.g. {flag} 2:50") from None


def cli_k_options(k_text: str, k_range_text: Optional[str], n_images: int
                  ) -> Tuple[Union[int, str], Optional[Tuple[int, int]]]:
    """``--k`` and ``--k-range`` as LAIC's ``(n_clusters, k_range)``, checked against N before any work."""
    if k_text == AUTO:
        k_range = None if k_range_text is None else parse_k_range(k_range_text)
        check_k_range(k_range, n_images, name="--k-range")
        return AUTO, k_range
    try:
        k = int(k_text)
    except ValueError:
        raise ValueError(f"--k must be an integer or 'auto', got {k_text!r}") from None
    if k_range_text is not None:
        raise ValueError("--k-range only applies with --k auto; drop it or pass --k auto")
    if not MIN_K <= k <= n_images:
        raise ValueError(f"--k must be between {MIN_K} and the number of images N = {n_images}, or 'auto'; got {k}")
    return k, None


def print_k_choice(model) -> int:
    """After a fit: the score curve and the choice when K was searched; the K used, either way."""
    if model.k_scores_ is not None:
        print(format_scores(model.k_scores_, model.n_clusters_))
        print(f"chosen K = {model.n_clusters_}")
    return model.n_clusters_


def k_search_record(model, k_range, n_images: int) -> Dict:
    """run.json's "k_search" of a fit that searched K (--k auto): the range, the curve it chose from (a score of
    None: a candidate not scored: clusters left empty, or no finite silhouette) and the doubts the fit warned of
    (laic.select_k.doubts: a choice at an end of the range, no structure), so that a later reader of the run sees
    them; nothing for a fit at a given K."""
    if model.k_scores_ is None:
        return {}
    k_range = check_k_range(k_range, n_images)
    selection = KSelection(model.n_clusters_, model.k_scores_, k_range, n_images)
    return {"k_search": {"range": list(k_range),
                         "scores": [[k, s if math.isfinite(s) else None] for k, s in model.k_scores_],
                         "doubts": doubts(selection)}}
