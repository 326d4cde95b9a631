"""consistent_neighbours: the image-space neighbours that the text space agrees with.

It keeps an image-space neighbour ``j`` of row ``i`` only where ``j`` is also among row ``i``'s text-space neighbours
("in both top-k lists"). Given the two feature sets and ``k`` it builds both graphs and filters them in one pass (the
fused Triton kernel on GPU; elsewhere the composition ``reference.consistent_neighbours``, its graphs built by the
``symmetric`` backend); given two neighbour lists
it filters them. We chose this rule over mutual neighbours (``i`` in ``j``'s list as well) because it is a per-row
test on two lists the caller already has, keeps more edges at small k, and still drops the image-space neighbours the
language side disagrees with, which is what the filter is for.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, reference, symmetric
from .backends import Backend, always, dispatch, triton_backend
from .knn_graph import unit_rows, validate_features
from .reference.consistent_neighbours import filter_neighbours


def _neighbour_lists(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} must be an integer tensor of row indices, got {x.dtype}; convert it with .long() "
                         "(or pass features and k to build the graphs here)")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, k] tensor of neighbour indices, got shape {tuple(x.shape)}")
    n = x.shape[0]
    in_order = x.sort(dim=1).values
    outside, itself, twice = torch.stack([((x < 0) | (x >= n)).any(),
                                          (x == torch.arange(n, device=x.device)[:, None]).any(),
                                          (in_order[:, 1:] == in_order[:, :-1]).any()]).tolist()   # one read
    if outside:
        raise ValueError(f"{name} has entries outside [0, N) = [0, {n}); every entry must be a row index "
                         "(pass the full top-k lists, without padding)")
    if itself:
        raise ValueError(f"{name} has a row that lists itself; a row is not its own neighbour (knn_graph leaves it "
                         "out)")
    if twice:
        raise ValueError(f"{name} has a row that lists a neighbour twice; pass distinct indices in each row (the "
                         "filtered lists would repeat it)")
    return x.long()


# The backends of consistent_neighbours from features (knn_graph itself runs on similarity_topk's).
BACKENDS = (
    triton_backend("consistent_neighbours", outputs_differentiable=False),   # int64 and bool outputs: no gradient
    symmetric.CONSISTENT_NEIGHBOURS,     # each graph's pair products once, then the reference's filter
    Backend("reference", always, reference.consistent_neighbours),
)


def consistent_neighbours(image: torch.Tensor, text: torch.Tensor, k: Optional[int] = None, *,
                          return_graphs: bool = False) -> Tuple[torch.Tensor, ...]:
    """The image-space neighbours that the text space agrees with, as padded indices and a validity mask.

    Neighbour ``j = image_neighbours[i, a]`` is kept when ``j`` also appears in ``text_neighbours[i]`` (in both top-k
    lists). Kept neighbours are compacted to the left in image-space order; the rest of the row is ``-1`` with mask
    False. A row where no neighbour agrees keeps its best image-space neighbour ``image_neighbours[i, 0]`` (mask True),
    so that every row always has at least one neighbour to sample.

    Two ways to call it:
      ``consistent_neighbours(image_features, text_features, k)``: ``[N, D_image]`` and ``[N, D_text]`` float
        features of the same N rows (any scale: rows are L2-normalised, as in :func:`knn_graph`), ``1 <= k <= N - 1``.
        The graphs are ``knn_graph(image_features, k)[1]`` and ``knn_graph(text_features, k)[1]``, built and filtered
        in one pass on GPU. With ``return_graphs=True`` those two lists are returned as well.
      ``consistent_neighbours(image_neighbours, text_neighbours)``: two ``[N, k]`` integer tensors of row indices,
        best first, that the caller already has (e.g. from :func:`knn_graph`).

    Returns:
        ``(indices[N, k] int64, mask[N, k] bool)``, ``mask.sum(1) >= 1`` for every row; with ``return_graphs``
        followed by ``(image_neighbours[N, k], text_neighbours[N, k])`` int64.
    """
    checks.true_or_false("return_graphs", return_graphs)
    if k is None:
        if return_graphs:
            raise ValueError("return_graphs=True needs features and k (the neighbour lists were passed in)")
        return _filter_lists(image, text)
    _no_lists_with_k(image=image, text=text, k=k)
    validate_features("image_features", image, k)
    validate_features("text_features", text, k)
    checks.same_device(image_features=image, text_features=text)
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"image_features and text_features must describe the same N rows, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    # Detached: no output (int64 indices, a bool mask) carries a gradient, so autograd need not record the unit rows
    # (it saved them for a backward that never comes, and features that require grad turned the fast backends away).
    return dispatch("consistent_neighbours", BACKENDS, unit_rows(image.detach()), unit_rows(text.detach()), k,
                    bool(return_graphs))


def _no_lists_with_k(*, image, text, k) -> None:
    """Two integer tensors with ``k`` are neighbour lists passed to the features' call, where "image_features must be
    float32 ... convert it with .float()" would have built graphs of the indices as if they were features. (One
    integer tensor beside float features is a feature set in the wrong dtype: validate_features says so.)"""
    if all(isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
           for x in (image, text)):
        raise ValueError(f"image_features and text_features are integer tensors ({image.dtype}, {text.dtype}), "
                         f"neighbour lists, and k = {k!r} was given: to filter lists you already have, drop k "
                         "(consistent_neighbours(image_neighbours, text_neighbours)); to build the graphs here, pass "
                         "float features with k")


def _filter_lists(image_neighbours, text_neighbours) -> Tuple[torch.Tensor, torch.Tensor]:
    image = _neighbour_lists("image_neighbours", image_neighbours)
    text = _neighbour_lists("text_neighbours", text_neighbours)
    checks.same_device(image_neighbours=image, text_neighbours=text)
    if image.shape != text.shape:
        raise ValueError(f"image_neighbours and text_neighbours must have the same shape [N, k], got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}; build both graphs with the same k")
    return filter_neighbours(image, text)
