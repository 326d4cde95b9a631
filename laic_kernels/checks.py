"""Input checks shared by the public ops: each raises ValueError naming the argument and saying how to fix it."""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Inside values_checked(), the value checks (a scan of the whole tensor and a device sync each) are skipped.
_values_checked: contextvars.ContextVar[bool] = contextvars.ContextVar("laic_values_checked", default=False)


@contextlib.contextmanager
def values_checked() -> Iterator[None]:
    """For a caller that checked its inputs once at its own entry (e.g. ``laic.LAIC.fit``): the ops called inside
    skip :func:`finite`, :func:`all_finite` and :func:`finite_dot_products`, which would otherwise scan the same
    data at every call. Shape, dtype, device and argument checks still run."""
    token = _values_checked.set(True)
    try:
        yield
    finally:
        _values_checked.reset(token)


def tensor(name: str, x, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> torch.Tensor:
    """``x`` must be a floating tensor of the given rank."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}; convert it with .float()")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the 'meta' device, which holds shapes but no values; pass it on 'cpu' or "
                         "'cuda'")
    if x.layout != torch.strided:   # a sparse tensor failed deep inside with "Could not run 'aten::...' ... Sparse"
        raise ValueError(f"{name} must be a dense tensor, got layout {x.layout}; convert it with .to_dense()")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' * (ndim != 1)}, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def values_are_checked() -> bool:
    """Whether the caller is inside :func:`values_checked` (an op's own value checks then skip)."""
    return _values_checked.get()


def sum_is_finite(x: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor, not read: True proves every entry of ``x`` finite (a NaN or an infinity makes any sum NaN
    or infinite); False may also be finite entries whose sum overflows, which :func:`is_finite` then tells apart. One
    reduction, where ``isfinite(x).all()`` writes a bool tensor of x's size and reduces it: on the CPU 13 against
    196 us at 256 x 512, 8 against 183 ms at 100k x 512 (torch 2.14, 2 threads, an ad hoc timing). Half precision is
    summed in float32: 200k x 512 unit rows in float16 summed to inf in float16, and every call made the second pass."""
    # detached: autograd saved the sum of features that require grad
    wider = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    return torch.isfinite(x.detach().sum(dtype=wider))


def is_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite: one device read, a second only when the sum is not finite."""
    return bool(sum_is_finite(x)) or bool(torch.isfinite(x).all())


NOT_FINITE = "contains NaN or infinite values; clean the input (e.g. torch.nan_to_num) first"


def finite(name: str, x: torch.Tensor) -> None:
    if _values_checked.get():
        return
    if not is_finite(x):
        raise ValueError(f"{name} {NOT_FINITE}")


def all_finite(**tensors: Optional[torch.Tensor]) -> None:
    """:func:`finite` on every tensor given, with one device synchronisation instead of one per tensor (ops call this
    at every training step); the per-tensor check runs only when a sum is not finite, to tell an overflowing sum
    from a bad value and to name the culprit."""
    present = {name: x for name, x in tensors.items() if x is not None}
    if not present or _values_checked.get():
        return
    flags = torch.stack([sum_is_finite(x) for x in present.values()])
    if not bool(flags.all()):
        for name, x in present.items():
            finite(name, x)


FLOAT32_MAX = torch.finfo(torch.float32).max


def extremes(x: torch.Tensor, dim: Optional[int] = None, keepdim: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.aminmax(x, dim=dim, keepdim=keepdim)``: the same values (NaN where a reduced entry is NaN; a zero's
    sign may differ), computed on the CPU along a dimension as ``amin`` and ``amax``. torch's CPU ``aminmax`` along
    a dimension is not vectorised: on an AVX2 CPU (torch 2.14) 1.05 ms against 0.07 ms for the rows of [500, 512] on
    one thread, 175 against 48 ms for [100000, 512] on two. Over the whole tensor, and on a GPU (one read of the
    tensor, not two; not measured otherwise), ``aminmax`` itself."""
    if dim is None or x.device.type != "cpu":
        return torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim, keepdim=keepdim)
    return x.amin(dim, keepdim=keepdim), x.amax(dim, keepdim=keepdim)


def magnitude(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``max |x|`` (over ``dim``, else all of ``x``) on the device, NaN or infinite where an entry is: no read, and
    no copy of ``x``, unlike ``x.abs().max()``."""
    low, high = extremes(x.detach(), dim)
    return torch.maximum(-low, high)


def largest_magnitude(x: torch.Tensor) -> float:
    """:func:`magnitude` of all of ``x``, read (one device read)."""
    return float(magnitude(x))


# Dot products of rows this small lose precision, then their order, in float32: its normal numbers end at
# 2^-126 = 1.2e-38, and a sum's terms lie below the largest |q_d k_d| by the rows' own spread (rows of 1e-25 against
# keys of 1e-25 came out all zero, ranked by index). A margin of 2^26 above that edge.
SMALLEST_DOT_SCALE = 2.0 ** -100


def finite_dot_products(queries_name: str, queries: torch.Tensor, keys_name: str, keys: torch.Tensor,
                        divided_by: Optional[Tuple[str, float]] = None) -> Optional[Tuple[float, float]]:
    """:func:`finite` on both, and every dot product of a row of ``queries`` with a row of ``keys`` (over
    ``divided_by = (name, value)``, a temperature, where given) a finite float32 (the kernels compute in float32
    and rank or exponentiate finite values): every entry below float32's largest value, and ``D max|q| max|k|``, and
    that over ``value`` where it is below 1, below half of it (a margin for the rounding of tf32 operands and of the
    sums); and no non-zero query row so small against the keys that its products lose their precision
    (``max|q_i| max|k|`` below ``SMALLEST_DOT_SCALE``: rows of 1e-25 gave all-zero similarities, ranked by index).
    One read of each tensor (of one, when ``keys is queries``: a set against itself); all-zero keys pass (every
    product is exactly 0);
    returns ``(max|q|, max|k|)``, or None when skipped
    inside :func:`values_checked` like :func:`finite`."""
    if _values_checked.get():
        return None
    rows = magnitude(queries, dim=1)
    non_zero = torch.where(rows > 0, rows, torch.full_like(rows, math.inf))   # each row's magnitude, inf if zero
    q, q_smallest = torch.stack([rows.max(), non_zero.min()]).double().tolist()
    if not math.isfinite(q):
        raise ValueError(f"{queries_name} {NOT_FINITE}")
    k = q if keys is queries else largest_magnitude(keys)
    if not math.isfinite(k):
        raise ValueError(f"{keys_name} {NOT_FINITE}")
    name, value = divided_by if divided_by is not None else ("", 1.0)
    # The products are computed, then divided: both must stay finite (a temperature above 1 hid an overflow).
    if max(q, k) >= FLOAT32_MAX or queries.shape[1] * q * k / min(value, 1.0) >= FLOAT32_MAX / 2:
        over = f" over {name} = {value:g}" if divided_by is not None else ""
        larger = f", or take a larger {name}" if divided_by is not None and value < 1 else ""
        raise ValueError(f"{queries_name} and {keys_name} reach {q:.3g} and {k:.3g} in magnitude: at D = "
                         f"{queries.shape[1]} their dot products{over} may overflow float32 (up to "
                         f"{FLOAT32_MAX:.3g}), which the similarities are computed in; scale the features down (for "
                         f"cosine similarities, normalise the rows){larger}")
    if k > 0 and q_smallest * k < SMALLEST_DOT_SCALE:   # all-zero keys: every product is exactly 0, nothing lost
        row = int(torch.argmin(non_zero))
        small = keys_name if k <= q_smallest else f"row {row} of {queries_name}"
        raise ValueError(f"{small} is too small: row {row} of {queries_name} reaches {q_smallest:.3g} in magnitude and "
                         f"{keys_name} {k:.3g}, so their dot products fall below {SMALLEST_DOT_SCALE:.3g}, where "
                         "float32 (which the similarities are computed in) loses their precision and then their "
                         "order (down to ties ranked by index); scale the features up (for cosine similarities, "
                         "normalise the rows)")
    _survives_float32(queries_name, queries, q_smallest, non_zero, keys_name, keys, k)
    return q, k


FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _survives_float32(queries_name: str, queries: torch.Tensor, q_smallest: float, non_zero: torch.Tensor,
                      keys_name: str, keys: torch.Tensor, k: float) -> None:
    """float64 operands are cast to float32: a non-zero query row, or keys, all below float32's smallest normal
    number would become subnormal or zero there (rows of 1e-46 against keys of 1e37 passed the product's check, then
    ranked by index), which the product alone does not show. Keys are checked as a whole (their largest row), query
    rows one by one: a single tiny float64 key row among normal ones becomes zero too, its similarities 0 where
    they were near 0 anyway. ``non_zero``: the query rows' magnitudes, infinite for all-zero rows."""
    if queries.dtype == torch.float64 and q_smallest < FLOAT32_TINY:
        row = int(torch.argmin(non_zero))
        small, value = f"row {row} of {queries_name}", q_smallest
    elif keys.dtype == torch.float64 and 0 < k < FLOAT32_TINY:
        small, value = keys_name, k
    else:
        return
    raise ValueError(f"{small} is too small: it reaches {value:.3g} in magnitude, below float32's smallest normal "
                     f"number ({FLOAT32_TINY:.3g}), so its float64 values lose their precision (down to zero) in "
                     "float32, which the similarities are computed in; scale the features up (for cosine "
                     "similarities, normalise the rows)")


def non_empty(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0 and x.dim() > 2:   # a batch of problems (sinkhorn's [..., N, K])
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}: dimension {list(x.shape).index(0)} has size 0); "
                         "pass at least one value along every dimension")
    if x.numel() == 0 and x.dim() >= 2 and x.shape[0] > 0:
        raise ValueError(f"{name} has rows but no columns (shape {tuple(x.shape)}); each row needs at least one "
                         "value (an embedding)")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one row")


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"inputs are on different devices ({where}); move them to one device with .to(device)")


def same_size(names: Sequence[str], sizes: Sequence[int], what: str) -> None:
    if len(set(sizes)) > 1:
        where = ", ".join(f"{n}: {s}" for n, s in zip(names, sizes))
        raise ValueError(f"{' and '.join(names)} must have the same {what} ({where})")


def is_int(value) -> bool:
    """A whole number: Python's or numpy's int (a value read back from an array), never a bool (True is an int)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number, numpy's included, never a bool; a string such as "0.5x" is not one (comparing it would raise
    a TypeError)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(name: str, value: float) -> None:
    if not (is_real(value) and value > 0 and value == value and value != float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def true_or_false(name: str, value) -> None:
    """An on/off option: a bool, or numpy's (e.g. read back from an array). Anything else is refused, 1 and "no"
    included: a truthy string would switch the option on."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__}); pass a bool, e.g. "
                         f"{name}=True")


def int_in_range(name: str, value, low: int, high: int, hint: str = "", type_hint: str = "") -> None:
    """``value`` an int in [low, high]; ``hint`` follows the range error, ``type_hint`` the wrong-type one (e.g.
    that None is not taken: most hints explain the range, and read wrongly after "got str")."""
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}{type_hint}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}{hint}")
