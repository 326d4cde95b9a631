"""The fit's inputs, checked once at the public entry (``LAIC.fit`` / ``LAIC.predict``): numpy arrays or tensors of
any float dtype become float32 tensors, and bad values are errors that name the argument. The messages for bad rows
and the long-double conversion are also those of the files read by the commands (``laic.embed_cache.read_features``,
``laic.vocab``), so that the CLI and the API say the same of the same array."""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from laic_kernels import checks
from laic_kernels.knn_graph import exactly_rescaled

from .operands import fixed_directions, lexicographic_order
from .runtime import first_line


def as_tensor(name: str, x, *, ndim: int, items: str = "images") -> torch.Tensor:
    """numpy array or torch tensor of any float dtype -> float32 CPU-or-device tensor, checked (float64 rows
    rescaled exactly by a power of two each, so that any finite row keeps its direction in float32). Other
    array-likes that ``np.asarray`` reads as floats (a list of rows, a pandas DataFrame of float columns; pandas'
    nullable "Float32" columns read as objects, refused with the conversion to make)."""
    convert = ".astype(np.float32)"
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        x, convert = _as_array(name, x), " = np.asarray(..., dtype=np.float32)"
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must hold floating-point values, got dtype {x.dtype}; convert with "
                             f"{name}{convert}")
        if x.dtype.itemsize > 8:    # long double: torch has no such dtype
            x = long_double_as_float64(x)
        # torch reads native byte order only (a big-endian .npy from another machine).
        x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
        x = _shared(x)
    if ndim == 2 and x.ndim == 1 and x.shape[0] > 0:   # one row given as a vector (model.predict(x[0]))
        raise ValueError(f"{name} must have 2 dimensions [N, D], got shape {tuple(x.shape)}: one row is [1, D], "
                         f"pass {name}[None] (or .reshape(1, -1))")
    checks.tensor(name, x, ndim=ndim)
    checks.non_empty(name, x)
    if not checks.values_are_checked() and not checks.is_finite(x):   # the rows named, as read_features names them
        bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"{name}: {non_finite_rows_message(bad, f'{x.shape[0]} row(s)', items)}")
    x = x.detach()   # laic never back-propagates into its inputs
    # Only an exactly zero row has no direction: any other scale is normalised exactly (operands.unit_rows).
    zero = (~x.ne(0).any(dim=1)).nonzero().flatten()
    if len(zero):
        raise ValueError(f"{name}: {zero_rows_message(zero.tolist(), x.shape[0], items)}")
    if x.dtype == torch.float64:
        # float64 rows may lie beyond float32's range (1e300, 1e-50): each is first scaled exactly by a power of two
        # (the fit uses the rows' directions only), so that it keeps its direction in float32.
        return exactly_rescaled(x).float().contiguous()   # contiguous: see below (a transposed tensor stays strided)
    # Contiguous: a strided view would take other BLAS paths (other roundings) than the same values in a row-major
    # array, and stage 0 is chaotic in the last bits: the same features must give the same clustering.
    return x.float().contiguous()


def column_names(name: str, x) -> Optional[np.ndarray]:
    """The column names of a data frame (an object with ``columns`` that is no array: pandas', polars') when they
    are all strings, as scikit-learn records them (``feature_names_in_``); None for anything else (a frame's default
    integer columns, an array). Names of mixed kinds are refused, as scikit-learn refuses them."""
    columns = getattr(x, "columns", None)
    if columns is None or isinstance(x, (np.ndarray, torch.Tensor)):
        return None
    columns = list(columns)
    # Each item looked at before any array is made of them: a table whose columns are its column arrays (pyarrow's)
    # made an [N, D] array of Python objects.
    strings = [isinstance(n, str) for n in columns]
    if columns and all(strings):
        return np.asarray(columns, dtype=object)
    if any(strings):
        kinds = sorted({type(n).__name__ for n in columns})
        raise ValueError(f"{name}'s column names are of mixed kinds ({', '.join(kinds)}); make them all strings "
                         f"({name}.columns = {name}.columns.astype(str)) or all not")
    return None


def as_fit_array(name: str, x: np.ndarray, items: str = "images") -> np.ndarray:
    """``x`` [N, D] as LAIC.fit takes it (:func:`as_tensor`: float32 in C order and native byte order, float64 and
    long double rows each first scaled exactly by a power of two), as a numpy array: for the readers of files, which
    check the values themselves (naming the file's rows or nouns) and hand the fit this one copy."""
    with checks.values_checked():
        return as_tensor(name, x, ndim=2, items=items).numpy()


def _shared(x: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy``; a read-only array (np.load's mmap_mode="r") is shared as it is, without torch's
    warning that it is not writable: laic never writes into its inputs. torch says it once a process, and only
    that first time inside ``catch_warnings``: entering it empties every module's record of the warnings already
    shown, and each predict on a numpy array showed the program's own warnings (and laic's) again, once a call
    (20,000 lines from 10,000 small predicts)."""
    global _READ_ONLY_QUIETED
    if x.flags.writeable or _READ_ONLY_QUIETED:
        return torch.from_numpy(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        shared = torch.from_numpy(x)
    _READ_ONLY_QUIETED = True
    return shared


_READ_ONLY_QUIETED = False   # torch's warning about a read-only array was said (and quieted) in this process


def _as_array(name: str, x) -> np.ndarray:
    """A list of rows, a tuple, or an object with ``__array__`` (pandas, xarray) as a numpy array; anything else, or
    rows of unequal lengths, refused by name."""
    if hasattr(x, "toarray") and hasattr(x, "nnz"):    # a scipy.sparse matrix or array
        raise ValueError(f"{name} must be dense, got a sparse {type(x).__name__}; convert it with .toarray() (CLIP "
                         "embeddings have no zeros to spare)")
    if not (isinstance(x, (list, tuple)) or hasattr(x, "__array__")):
        raise ValueError(f"{name} must be a numpy array, a torch tensor or a list of rows, got {type(x).__name__}")
    try:
        return np.asarray(x)
    except (ValueError, TypeError, RuntimeError) as exc:   # (RuntimeError: a tensor that requires grad)
        raise ValueError(f"{name} cannot be read as an array [N, D] ({first_line(exc)}); pass rows of equal "
                         "length, as one numpy array or tensor (torch.stack(rows) for a list of tensors)") from None


def non_finite_rows_message(bad: Sequence[int], among: str, items: str = "images") -> str:
    """What is wrong with rows ``bad`` that hold NaN or infinite values, of ``among`` ("500 row(s)"), and what to
    do: compute them again (torch.nan_to_num made a NaN row all zeros, refused next, and an infinite entry a row
    along one axis, clustered as if real)."""
    # An image's row dropped moves every later one off its file and label; a noun's goes with its name.
    fix = (f"compute those {items} again (dropping them moves every later row off its image)" if items == "images"
           else f"drop them with their names, or compute those {items} again")
    return f"{len(bad)} of {among} contain NaN or infinite values: rows {_first_rows(bad)}; {fix}"


def zero_rows_message(zero: Sequence[int], n: int, items: str = "images", among: Optional[str] = None) -> str:
    """What is wrong with all-zero feature rows ``zero`` (indices) of ``n`` ``items`` (``among``: the rows looked
    at, when not all ``n``), and what to do."""
    use = "clustered" if items == "images" else "used"
    # As for non-finite rows: an image's row dropped moves every later one off its file and label; a noun's goes
    # with its name.
    fix = (f"embed those {items} again (dropping them moves every later row off its image)" if items == "images"
           else f"drop them with their names, or embed those {items} again")
    return (f"{len(zero)} of {among or f'{n} row(s)'} are all zeros (norm 0), so they point nowhere and cannot be "
            f"{use}: rows {_first_rows(zero)}; {fix}")


def _first_rows(rows: Sequence[int], shown: int = 10) -> str:
    """``"3, 7, ..."``: the first ``shown`` of ``rows``."""
    return ", ".join(str(i) for i in rows[:shown]) + (", ..." if len(rows) > shown else "")


def long_double_as_float64(x: np.ndarray) -> np.ndarray:
    """Long double rows as float64, each first scaled exactly by a power of two (its largest entry into [0.5, 1)):
    long double reaches 1e4932, far beyond float64, and only the rows' directions matter. NaN, infinite and zero
    rows pass unchanged (the checks after name them)."""
    if x.ndim != 2 or x.size == 0:
        return x.astype(np.float64)     # refused by the shape checks after
    largest = np.abs(x).max(axis=1, keepdims=True)
    _, exponent = np.frexp(np.where(np.isfinite(largest), largest, 0))
    return np.ldexp(x, -exponent).astype(np.float64)


def _names(noun_names) -> List[str]:
    """The noun names as a list of str (any sequence or iterable of strings, numpy's included)."""
    if isinstance(noun_names, (str, bytes)):
        raise ValueError("noun_names must be a sequence of names, one per noun row, not a single string")
    if isinstance(noun_names, (set, frozenset)):   # in hash order, another in each process: names on other rows
        raise ValueError(f"noun_names must be in the order of the noun rows, got an unordered "
                         f"{type(noun_names).__name__}; pass a list, the name of row i at position i")
    names = list(noun_names)
    wrong = next((i for i, name in enumerate(names) if not isinstance(name, str)), None)
    if wrong is not None:
        raise ValueError(f"noun_names must hold strings; entry {wrong} is {names[wrong]!r} "
                         f"({type(names[wrong]).__name__})")
    blank = next((i for i, name in enumerate(names) if not name.strip()), None)
    if blank is not None:   # it would name clusters with nothing
        raise ValueError(f"noun_names entry {blank} is blank; every noun row needs its name")
    for i, name in enumerate(names):   # names are written as UTF-8 (model files, clusters.json, reports)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"noun_names entry {i} ({name!r}) is not valid Unicode ({exc.reason} at character "
                             f"{exc.start}; a file name decoded with os.fsdecode keeps its undecodable bytes so): "
                             f"pass names that encode as UTF-8") from None
    return [str(name) for name in names]


def first_of_identical_rows(x: torch.Tensor) -> torch.Tensor:
    """The indices (ascending) of the rows of ``x`` ``[M, D]`` that no earlier row equals exactly."""
    return torch.unique(first_equal_rows(x))


def first_equal_rows(x: torch.Tensor) -> torch.Tensor:
    """Int64 ``[M]``: for each row of ``x`` ``[M, D]``, the index of the first row that equals it exactly (its own
    where no earlier row does)."""
    _, group = torch.unique(x, dim=0, return_inverse=True)
    order = torch.arange(x.shape[0], device=x.device)
    first = torch.full((int(group.max()) + 1,), x.shape[0], dtype=order.dtype, device=x.device)
    return first.scatter_reduce_(0, group, order, reduce="amin")[group]


def distinct_rows(nouns: torch.Tensor) -> torch.Tensor:
    """The indices (ascending) of the noun rows that repeat no earlier one by direction (:func:`distinct_nouns`)."""
    return first_of_identical_rows(exactly_rescaled(nouns))


# Two rows of one name this close (the distance of their unit rows) are one noun: the same embedding renormalised
# in float32 lies within 4.3e-8 of its original (the most over the shared 1403-noun CLIP vocabulary), while that
# vocabulary's two nearest distinct nouns lie 7.9e-4 apart. (A float32 row rounded to float16 moves farther, about
# 5e-4: that is another embedding, as near as distinct nouns come.)
NEAR_COPY = 1e-5


def distinct_nouns(nouns: torch.Tensor, noun_names: List[str]) -> Tuple[torch.Tensor, List[str], int]:
    """The noun rows without repeats (each kept once, with its first name), their names, and how many rows were
    dropped: a repeated row is the same text embedding, and kept twice it would fill two of a centre's noun slots,
    weigh twice in the counterparts' mixtures and name a cluster twice. Rows are compared as the fit uses them, by
    direction: each scaled exactly by a power of two first, as float64 rows already are (a row and its double were
    one noun in float64 and two in float32); and rows of one name within ``NEAR_COPY`` of each other as unit rows
    are one noun too (a vocabulary merged from two encodings of the same nouns: a rounding apart, they were two)."""
    keep = distinct_rows(nouns)
    keep = without_near_copies_of_one_name(nouns, noun_names, keep)
    if len(keep) == nouns.shape[0]:
        return nouns, noun_names, 0
    return nouns[keep], [noun_names[i] for i in keep.tolist()], nouns.shape[0] - len(keep)


def n_distinct_nouns(noun_features, noun_names: Optional[Sequence[str]]) -> int:
    """How many nouns a fit keeps of these (:func:`distinct_nouns`), known before any image is read."""
    nouns = as_tensor("noun_features", noun_features, ndim=2, items="nouns")
    return len(distinct_nouns(nouns, checked_names(noun_names, nouns.shape[0]))[1])


def without_near_copies_of_one_name(nouns: torch.Tensor, noun_names: List[str], keep: torch.Tensor) -> torch.Tensor:
    """``keep`` (ascending row indices) without each row within ``NEAR_COPY`` of a kept row of its name that comes
    before it in the order of their values (lexicographic, as :func:`laic.stage0.in_canonical_order`): which of
    the copies stays does not depend on the vocabulary's row order."""
    rows_of = {}
    for i in keep.tolist():
        rows_of.setdefault(noun_names[i], []).append(i)
    named_twice = [np.asarray(rows) for rows in rows_of.values() if len(rows) > 1]
    if not named_twice:
        return keep
    units = torch.nn.functional.normalize(exactly_rescaled(nouns).double(), dim=1).cpu().numpy()
    directions = fixed_directions(units.shape[1], 2).numpy()
    dropped = []
    for rows in named_twice:
        rows = _with_a_near_row(rows, units[rows] @ directions)
        if len(rows) > 1:
            dropped.extend(_near_copies_in_value_order(rows, units))
    if not dropped:
        return keep
    return keep[~torch.isin(keep, torch.tensor(dropped, dtype=keep.dtype, device=keep.device))]


def _with_a_near_row(rows: np.ndarray, projections: np.ndarray) -> np.ndarray:
    """The ``rows`` with another row whose projections (``[R, 2]``, on two fixed unit directions) both lie within
    ``NEAR_COPY`` of theirs, as those of a row that near must: distinct nouns under one name (a careless list
    naming all rows alike) are rarely that close in both, so they cost a sort, not their pairs."""
    order = np.argsort(projections[:, 0], kind="stable")
    first, second = projections[order, 0], projections[order, 1]
    near = np.zeros(len(rows), dtype=bool)
    for offset in range(1, len(rows)):   # pairs `offset` apart in the first projection's order
        close = first[offset:] - first[:-offset] <= NEAR_COPY
        if not close.any():
            break                        # farther apart in the sorted first projection: none closer
        close &= np.abs(second[offset:] - second[:-offset]) <= NEAR_COPY
        near[order[offset:][close]] = near[order[:-offset][close]] = True
    return rows[near]


def _near_copies_in_value_order(rows: np.ndarray, units: np.ndarray) -> List[int]:
    """Of ``rows`` (one name's), those within ``NEAR_COPY`` of a kept one before them in the order of values. Each
    row is compared with the kept ones: copies of one noun cost a pass, but thousands of distinct rows of one name
    packed within about 1e-4 of each other (no vocabulary's) cost their pairs (45 s for 8000 at D = 512)."""
    rows = rows[lexicographic_order(torch.from_numpy(units[rows])).numpy()]     # by value
    kept: List[int] = []
    dropped = []
    for i in rows:
        if kept and np.linalg.norm(units[kept] - units[i], axis=1).min() <= NEAR_COPY:
            dropped.append(int(i))
        else:
            kept.append(i)
    return dropped


def checked_inputs(image_features, noun_features, noun_names: Optional[Sequence[str]]
                   ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """``LAIC.fit``'s arrays as checked float32 tensors, and the noun names (default ``noun_<i>``)."""
    images = as_tensor("image_features", image_features, ndim=2)
    if noun_features is None:   # a Pipeline's fit(X), which hands the last step y=None
        raise ValueError("noun_features is missing: LAIC.fit(image_features, noun_features, noun_names) needs the "
                         "CLIP text embeddings [M, D] of a noun vocabulary (`laic vocab` writes them); in a Pipeline "
                         "pass them in y's place, pipe.fit(X, noun_features)")
    if _dimensions(noun_features) == 1:
        # scikit-learn's fit(X, y) habit: a label vector (an array or a plain list) in noun_features' place (its
        # dtype error said nothing of it, and for a list advised a conversion that led to "pass [None]")
        raise ValueError(f"noun_features must be [M, D] text embeddings of the nouns, got one dimension (shape "
                         f"{tuple(np.shape(noun_features))}): LAIC.fit takes (image_features, noun_features, "
                         "noun_names), never labels (score labels with laic.metrics.evaluate after the fit)")
    nouns = as_tensor("noun_features", noun_features, ndim=2, items="nouns")
    if images.shape[1] != nouns.shape[1]:
        raise ValueError(f"image_features and noun_features must have the same dimension D (the same CLIP "
                         f"model), got {images.shape[1]} and {nouns.shape[1]}")
    return images, nouns, checked_names(noun_names, nouns.shape[0])


def _dimensions(x) -> Optional[int]:
    """How many dimensions ``x`` has as an array (None where it cannot be read as one: refused by name after); a
    list or tuple read from its first row (as_tensor converts it whole, once)."""
    if hasattr(x, "ndim"):
        return x.ndim
    if isinstance(x, (list, tuple)) and len(x):
        first = _dimensions(x[0])
        return None if first is None else first + 1
    try:
        return np.ndim(x)
    except (ValueError, TypeError, RuntimeError):   # unequal rows; a bfloat16 tensor, or one needing grad, in a list
        return None


def checked_names(noun_names: Optional[Sequence[str]], n_nouns: int) -> List[str]:
    """The names of ``n_nouns`` noun rows as a list of str (default ``noun_<i>``), one per row."""
    if noun_names is None:
        return [f"noun_{i}" for i in range(n_nouns)]
    noun_names = _names(noun_names)
    if len(noun_names) != n_nouns:
        raise ValueError(f"noun_names has {len(noun_names)} entries but noun_features has {n_nouns} rows;"
                         " pass one name per noun row")
    return noun_names
