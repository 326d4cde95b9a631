"""Row chunking: bounded memory whatever N and M (the references, the symmetric graph's tiles, the pipeline's
passes over rows)."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

# At most this many float32 similarities are live at once (256 MB).
MAX_CHUNK_ELEMENTS = 1 << 26


def row_chunks(n_rows: int, row_width: int, max_elements: Optional[int] = None) -> Iterator[Tuple[int, int]]:
    """``(start, stop)`` row ranges of at most ``max_elements`` (default: ``MAX_CHUNK_ELEMENTS``, read at each call)
    elements of width ``row_width`` each (at least one row)."""
    step = max(1, (max_elements or MAX_CHUNK_ELEMENTS) // max(1, row_width))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)
