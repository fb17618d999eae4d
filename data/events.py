"""Raw events on disk and the EventGPT event-frame renderer.

Events are a structured array `EVENT_DTYPE` (x, y: uint16 pixel; t: int64 µs; p: uint8,
1 = ON / brighter, 0 = OFF / darker), sorted by t. Sources:

- `.npy` holding a 0-d object array with a pickled dict {x, y, t, p, ...}: the format
  EventGPT ships. The pickle is decoded by a restricted unpickler that only rebuilds numpy
  arrays, so no pickled code runs; `allow_pickle=True` (config `data.allow_pickle=true`)
  trusts the file and uses numpy's plain unpickler.
- `.npy` holding a plain structured array with fields x, y, t, p.
- DSEC-style HDF5 (`.h5` / `.hdf5`) with datasets `events/{x,y,t,p}`.

Non-array entries of a pickled dict (sensor size, clip start/end, ...) are returned as
`EventClip.meta`.

Every array is validated before it is packed (`_to_events`): finite, integer-valued coordinates
inside the sensor (its `width`/`height` from the file's metadata, else the `sensor` argument,
else the 16-bit range of the packed fields), finite integer timestamps, polarity in {0, 1} or
{-1, 1}; timestamps out of order are sorted with a warning. Anything else is a one-line
DataError naming the file, never a silently wrapped or cast value.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from numpy.lib import format as npy_format

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray

from specalign.errors import DataError
from specalign.io import atomic_path

log = logging.getLogger("specalign.events")

EVENT_DTYPE = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "u1")])
FIELDS = ("x", "y", "t", "p")
ON_COLOR = (255, 0, 0)    # p = 1
OFF_COLOR = (0, 0, 255)   # p = 0
CANVAS_COLOR = 255        # white

# what a truncated or malformed pickle raises
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                  KeyError, ImportError, OverflowError)
PICKLE_HINT = "set allow_pickle=True (config data.allow_pickle=true) only if you trust the file"


@dataclass
class EventClip:
    """Events of one file plus its metadata (the non-array keys of a pickled dict)."""

    events: np.ndarray          # [N] EVENT_DTYPE, sorted by t
    path: Path
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- reading

def read_event_clip(path: str | Path, allow_pickle: bool = False,
                    sensor: tuple[int, int] | None = None) -> EventClip:
    """Read and validate one event file (.npy pickled dict, .npy structured array, or .h5).

    sensor: (width, height) for files whose metadata does not say (e.g. (640, 480) for DSEC)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "event file not found")
    if path.suffix.lower() in (".h5", ".hdf5"):
        columns, meta = _read_h5(path)
    elif path.suffix.lower() == ".npy":
        columns, meta = _read_npy(path, allow_pickle)
    else:
        raise DataError(path, f"unknown event file type '{path.suffix}'", "expected .npy, .h5 or .hdf5")
    return EventClip(events=_to_events(path, columns, sensor_of(path, meta, sensor)), path=path, meta=meta)


def load_events(path: str | Path, allow_pickle: bool = False, sensor: tuple[int, int] | None = None) -> np.ndarray:
    """Events of a file as a [N] EVENT_DTYPE array sorted by t (see `read_event_clip`)."""
    return read_event_clip(path, allow_pickle, sensor).events


def sensor_of(path: Path, meta: dict, sensor: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height): the file's own metadata first, then `sensor`, then the packed fields' range."""
    if "width" in meta and "height" in meta:
        try:
            return int(meta["width"]), int(meta["height"])
        except (TypeError, ValueError):
            raise DataError(path, f"sensor size in the file's metadata is not a number: width={meta['width']!r}, "
                            f"height={meta['height']!r}") from None
    if sensor is not None:
        return int(sensor[0]), int(sensor[1])
    limit = int(np.iinfo(EVENT_DTYPE["x"]).max) + 1
    return limit, limit


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dtypes and scalars; refuses every other global."""

    ALLOWED: ClassVar[dict] = {
        **{(module, name): getattr(_multiarray, name)
           for module in ("numpy.core.multiarray", "numpy._core.multiarray")
           for name in ("_reconstruct", "scalar")},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DataError(self.path, f"pickle refers to '{module}.{name}', which the safe decoder "
                            "refuses (it only rebuilds numpy arrays)", PICKLE_HINT) from None


_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def _read_npy(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """Columns and metadata of a .npy file: structured array, or 0-d object array of a dict."""
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
            if version not in _HEADER_READERS:
                raise ValueError(f"unsupported .npy format version {version}")
            _, _, dtype = _HEADER_READERS[version](f)
        except (ValueError, OSError) as e:
            raise DataError(path, f"not a valid .npy file: {e}") from None
        if dtype.hasobject:
            obj = _load_trusted(path) if allow_pickle else _safe_unpickle(f, path)
            return _columns_of_dict(path, obj.item() if obj.shape == () else obj)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(path, f"unreadable .npy file: {e}") from None
    if arr.dtype.names is None:
        raise DataError(path, f"expected a structured array with fields {FIELDS} or a pickled dict, "
                        f"got a plain {arr.dtype} array of shape {arr.shape}")
    return {name: arr[name] for name in arr.dtype.names}, {}


def _safe_unpickle(f, path: Path) -> np.ndarray:
    """Decode the pickle after a .npy header with `_NumpyOnlyUnpickler`: no pickled code runs."""
    try:
        obj = _NumpyOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except _PICKLE_ERRORS as e:
        raise DataError(path, f"could not decode the pickled data: {type(e).__name__}: {e}") from None
    if not isinstance(obj, np.ndarray):
        raise DataError(path, f"expected a pickled numpy array, got {type(obj).__name__}")
    return obj


def _load_trusted(path: Path) -> np.ndarray:
    """The opt-in path: numpy's own unpickler, which runs whatever the pickle says."""
    try:
        return np.load(path, allow_pickle=True)
    except _PICKLE_ERRORS as e:
        raise DataError(path, f"could not unpickle the file: {type(e).__name__}: {e}") from None


def _columns_of_dict(path: Path, obj) -> tuple[dict, dict]:
    """Split a pickled dict into array columns and the remaining (metadata) entries."""
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a pickled dict with keys {FIELDS}, got {type(obj).__name__}")
    columns = {k: v for k, v in obj.items() if isinstance(v, np.ndarray) and v.ndim >= 1}
    meta = {k: (v.item() if isinstance(v, np.generic | np.ndarray) else v)
            for k, v in obj.items() if k not in columns}
    return columns, meta


def _read_h5(path: Path) -> tuple[dict, dict]:
    """Columns of a DSEC-style HDF5 file (`events/{x,y,t,p}`); `t_offset` becomes metadata."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "events" not in f:
                raise DataError(path, "HDF5 file has no 'events' group", "expected events/{x,y,t,p}")
            group = f["events"]
            columns = {k: group[k][()] for k in FIELDS if k in group}
            meta = {"t_offset": int(f["t_offset"][()])} if "t_offset" in f else {}
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise DataError(path, f"unreadable HDF5 file: {e}",
                        "compressed DSEC files may need `import hdf5plugin`") from None
    return columns, meta


def _to_events(path: Path, columns: dict, sensor: tuple[int, int]) -> np.ndarray:
    """Validate x/y/t/p columns and pack them into a t-sorted [N] EVENT_DTYPE array."""
    missing = [k for k in FIELDS if k not in columns]
    if missing:
        raise DataError(path, f"missing event fields {missing}; found {sorted(columns)}")
    cols = {k: np.asarray(columns[k]) for k in FIELDS}
    shapes = {k: c.shape for k, c in cols.items()}
    n = cols["t"].shape[0] if cols["t"].ndim == 1 else -1
    if any(s != (n,) for s in shapes.values()):
        raise DataError(path, f"event fields must be 1-D arrays of equal length, got shapes {shapes}")
    if n == 0:
        raise DataError(path, "the file holds no events")
    width, height = sensor
    for name, upper in (("x", width), ("y", height)):
        _check_integers(path, name, cols[name], 0, upper)
    _check_integers(path, "t", cols["t"], np.iinfo(np.int64).min, np.iinfo(np.int64).max)
    events = np.empty(n, EVENT_DTYPE)
    events["x"], events["y"], events["t"] = cols["x"], cols["y"], cols["t"]
    events["p"] = _polarity(path, cols["p"])
    if (np.diff(events["t"]) < 0).any():
        log.warning("%s: timestamps are not in order; sorted them", path)
        events = events[np.argsort(events["t"], kind="stable")]
    return events


def _check_integers(path: Path, name: str, values: np.ndarray, low: int, high: int) -> None:
    """Finite, integer-valued, in [low, high): a cast would otherwise wrap or turn NaN into INT64_MIN."""
    kind = values.dtype.kind
    if kind not in "biuf":
        raise DataError(path, f"event field {name} holds {values.dtype} values, not numbers")
    if kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(path, f"event field {name} holds {int(bad.sum())} NaN or infinite values "
                            f"(first at event {int(np.argmax(bad))})")
        frac = values != np.floor(values)
        if frac.any():
            i = int(np.argmax(frac))
            raise DataError(path, f"event field {name} holds non-integer values (event {i}: {values[i].item()!r})")
    out = (values < low) | (values >= high)
    if out.any():
        i = int(np.argmax(out))
        where = f"outside the sensor (0 <= {name} < {high})" if name in "xy" else "outside the 64-bit range"
        raise DataError(path, f"event field {name} = {values[i].item()!r} at event {i} is {where}")


def _polarity(path: Path, p: np.ndarray) -> np.ndarray:
    """{0, 1} or {-1, 1} (OFF, ON) -> 0/1; any other value is refused."""
    on = p == 1
    if not ((p == 0) | on).all() and not ((p == -1) | on).all():
        others = np.unique(p[~(on | (p == 0) | (p == -1))])[:6].tolist()
        raise DataError(path, f"event polarity must be in {{0, 1}} or {{-1, 1}}, found {others}"
                        + (" beside both 0 and -1" if not others else ""))
    return on.astype(np.uint8)


# ---------------------------------------------------------------------------- writing

def save_event_clip(path: str | Path, events: np.ndarray, meta: dict | None = None) -> None:
    """Write events in EventGPT's format: a 0-d object .npy holding a dict {x, y, t, p, **meta}.

    `meta` values should be plain Python scalars/strings so that the safe decoder reads them.
    """
    record = {"x": events["x"].astype(np.uint16), "y": events["y"].astype(np.uint16),
              "t": events["t"].astype(np.int64), "p": events["p"].astype(np.uint8), **(meta or {})}
    holder = np.empty((), dtype=object)
    holder[()] = record
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, holder, allow_pickle=True)


# ---------------------------------------------------------------------------- rendering

def chunk_bounds(n_events: int, n_frames: int) -> list[tuple[int, int]]:
    """EventGPT's chunk rule: N consecutive chunks of equal event count, the last takes the rest.

    Returns [(start, end)] index pairs into the time-sorted stream; chunk k holds
    n_events // n_frames events, the last chunk n_events - (n_frames - 1) * (n_events // n_frames).
    With fewer events than frames the leading chunks are empty.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    size = n_events // n_frames
    starts = [k * size for k in range(n_frames)]
    return list(zip(starts, starts[1:] + [n_events]))


def render_event_frames(events: np.ndarray, n_frames: int, height: int, width: int) -> list[np.ndarray]:
    """EventGPT input frames: one [height, width, 3] uint8 image per chunk of `chunk_bounds`.

    Each chunk is drawn on a white canvas, p=1 red, p=0 blue; where a pixel has several
    events in the chunk, the last one (in stream order) sets its colour.
    """
    if len(events) and (events["x"].max() >= width or events["y"].max() >= height):
        raise ValueError(f"events reach ({events['x'].max()}, {events['y'].max()}), outside the "
                         f"{width}x{height} canvas")
    return [_draw_chunk(events[a:b], height, width) for a, b in chunk_bounds(len(events), n_frames)]


def _draw_chunk(chunk: np.ndarray, height: int, width: int) -> np.ndarray:
    """One [H, W, 3] uint8 frame: white canvas, the last event at each pixel sets its colour."""
    canvas = np.full((height * width, 3), CANVAS_COLOR, np.uint8)
    pixel = chunk["y"].astype(np.int64) * width + chunk["x"]
    # np.unique keeps the first occurrence; on the reversed stream that is the last event
    pixels, first_in_reversed = np.unique(pixel[::-1], return_index=True)
    polarity = chunk["p"][::-1][first_in_reversed]
    canvas[pixels] = np.where(polarity[:, None] == 1, ON_COLOR, OFF_COLOR)
    return canvas.reshape(height, width, 3)
