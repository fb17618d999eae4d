"""Atomic file writes, and which directories a stage may write into.

Atomic: write to a temp file in the same directory, fsync, rename; a run killed at any moment
leaves either the old file or the new one, never half of one.

Ownership: every stage that writes a directory claims it first (`claim_output`), leaving a small
marker `.specalign.json` {stage, identity}. A stage writes only into a new or empty directory or
into its own earlier output of the same identity (a resume); anything else is refused before a
byte is written. The Hydra callback `specalign.stage.StageCheck` makes the same check before
Hydra writes its own records into the run directory.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from specalign.errors import OutputInUse
from specalign.identity import describe, differences, is_size


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it onto `path`. An OSError (a full disk, a
    read-only directory) names `path`, not the temp file, and leaves `path` as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except Exception as e:
        code = write_errno(e, tmp)
        if code:
            raise OSError(code, os.strerror(code), str(path)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_errno(e: Exception, tmp: Path) -> int | None:
    """The errno of a failed write of `tmp`: an OSError's (a write error carries no file name), or the
    one Rust writers (safetensors) put in their message, "(os error 28)"."""
    if isinstance(e, OSError):
        return e.errno if e.filename in (None, str(tmp), tmp) else None
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found.group(1)) if found else None


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def append_line(path: str | Path, line: str) -> None:
    """Append one line and flush it to disk (used for error logs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------- output ownership

MARKER = ".specalign.json"
# what Hydra itself puts into a run directory before a stage starts: its records and the job's log file
HYDRA_OWN = re.compile(r"^(\.hydra|stage_main\.log|train_ddp_process_\d+\.log)$")


def foreign_entries(path: Path, hydra_job: str | None = None) -> list[str]:
    """Names in `path` that neither specalign's marker nor Hydra's own records explain."""
    if not path.is_dir():
        return []
    own = {MARKER, f"{hydra_job}.log"} if hydra_job else {MARKER}
    return sorted(p.name for p in path.iterdir() if p.name not in own and not HYDRA_OWN.match(p.name))


def read_marker(path: Path) -> dict | None:
    p = path / MARKER
    if not p.is_file():
        return None
    try:
        marker = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutputInUse(f"{p}: unreadable ownership marker ({e}); delete the directory or choose another out=")
    return marker if isinstance(marker, dict) else {}


def check_output(path: str | Path, stage: str, hydra_job: str | None = None,
                 owned_if: Callable[[Path], bool] | None = None) -> dict | None:
    """Refuse `path` as `stage`'s output unless it is missing, empty, or `stage`'s own; return its marker.

    `owned_if(path)` recognises the stage's outputs written before markers existed (e.g. a store's manifest)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputInUse(f"{path}: out= must be a directory, this is a file; choose another out=")
    marker = read_marker(path)
    if marker is not None:
        if marker.get("stage") != stage:
            raise OutputInUse(f"{path}: holds the output of `specalign {marker.get('stage')}`, not of "
                              f"`specalign {stage}`; choose another out=")
        return marker
    foreign = foreign_entries(path, hydra_job)
    if foreign and not (owned_if and owned_if(path)):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputInUse(f"{path}: not empty and not written by `specalign {stage}` ({shown}); a stage writes "
                          "only into a new or empty directory or its own earlier output: choose another out=")
    return None


def claim_output(path: str | Path, stage: str, identity: dict | None = None, allow_change: bool = False,
                 owned_if: Callable[[Path], bool] | None = None) -> Path:
    """Make `path` the output directory of `stage` (of this `identity`), or refuse before writing into it.

    Accepted: a missing or empty directory (Hydra's own `.hydra/` and job log aside), or one whose marker
    says it is this stage's output of the same identity: a resume, or a rerun that rewrites its own files.
    Refused: files specalign did not write, another stage's output, or another identity (listing what
    differs). `allow_change` accepts another identity except other sizes (vocab/hidden), and records it."""
    path = Path(path)
    marker = check_output(path, stage, _hydra_job(), owned_if)
    if marker is not None:
        diffs = differences(marker.get("identity") or {}, identity or {})
        sizes = any(is_size(k) for k, _, _ in diffs)
        if diffs and (sizes or not allow_change):
            hint = "" if sizes else " (or pass allow_store_mismatch=true)"
            raise OutputInUse(f"{path}: holds `specalign {stage}` output of another identity: "
                              f"{describe(diffs, 'it has', 'this run has')}; choose another out={hint}")
        if not diffs and (identity is None or marker.get("identity") == identity):
            return path
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / MARKER, {"stage": stage, "identity": identity, "specalign_version": _version()})
    return path


def claim_file(path: str | Path, stage: str) -> Path:
    """An output file: new, or an image specalign wrote (its PNG `Software` text says so)."""
    path = Path(path)
    if path.is_dir():
        raise OutputInUse(f"{path}: out= names a directory; give a file name such as {path / 'curves.png'}")
    if path.exists():
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                software = str(im.info.get("Software", ""))
        except (UnidentifiedImageError, OSError):
            software = ""
        if not software.startswith("specalign"):
            raise OutputInUse(f"{path}: exists and was not written by specalign; `specalign {stage}` does not "
                              "overwrite it: choose another out=")
    return path


def _hydra_job() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().job.name if HydraConfig.initialized() else None
    except (ImportError, ValueError):
        return None


def _version() -> str:
    from specalign import __version__

    return __version__
