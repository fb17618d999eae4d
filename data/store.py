"""The feature store: one directory per extraction (or import) run.

Layout (docs/design.md, "Feature store"):

    manifest.json            identity of both models, layers, dtype, prompts, generation, counts
    rows.parquet             one row per (sample, question): tokens, lengths, split, shard location
    shards/<name>.safetensors  per-token hidden states, bf16; each shard also carries its rows
                             (safetensors metadata), so the row table can be rebuilt from shards
    heads.safetensors        both LM heads (+ the target's input embeddings), saved once
    errors.jsonl             one line per skipped sample with its reason

Shards are written atomically (temp file, then rename). A resumed run asks `done_keys()`
and skips what is already in a shard; `finalize()` rebuilds `rows.parquet` from the shards
in a canonical order, so an interrupted-then-resumed run ends with the same store as an
uninterrupted one.

Integrity: rows whose features hold NaN or inf are never written (`drop_nonfinite` lets a long
run skip and record them; `write_shard` refuses them). Each shard carries a CRC-32 of its
tensors' bytes in its metadata; `finalize()` lists, in the manifest's `checksums`, that value and
a CRC-32 of the header for every shard, and CRC-32s of heads.safetensors and rows.parquet. A
reader verifies each shard once per process on its first read (one pass over its bytes, which
also finds non-finite values) and names the shard and row of what it finds. Stores written before
checksums load with a log line and the finiteness check only.

Prompt context (format 2; data/features.py, docs/design.md §4): per row, the prompt row, the last prompt
token and the pooled video rows, in tensors laid row after row (`context_row` is the row's place), and the
manifest's "context" says which features and how many video rows. Version 1 stores load without it.

Hidden-state tensor names inside a shard: `{model}.h{idx}` for the input of decoder layer
`idx` (transformers' hidden_states[idx]) and `{model}.final` for the final norm output,
with `model` in {"target", "draft"}. Each tensor is [rows_in_shard_tokens, H]; a row's
slice is [offset, offset + target_len). Row i of a sample is the position whose next-token
prediction is target_tokens[i] (see vlms/alignment.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from specalign.data.features import feature_name, is_context

from specalign import __version__
from specalign.errors import DataError, StoreMismatch
from specalign.identity import IDENTITY_KEYS, describe, differences, store_identity
from specalign.io import append_line, atomic_path, write_json

log = logging.getLogger("specalign.store")

FORMAT = "specalign-feature-store"
FORMAT_VERSION = 2          # 2: the prompt context per row (manifest "context"); version 1 stores still load
READ_VERSIONS = (1, 2)
SPLITS = ("train", "val", "test")
__all__ = ["IDENTITY_KEYS", "FeatureStore", "StoreWriter"]

def row_schema():
    """Arrow schema of rows.parquet (pyarrow is imported only where tables are read or written)."""
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()),
        ("sample_id", pa.string()),
        ("question_id", pa.int32()),
        ("question", pa.string()),
        ("split", pa.string()),
        ("duration", pa.string()),
        ("target_tokens", pa.list_(pa.int32())),
        ("draft_tokens", pa.list_(pa.int32())),
        ("target_len", pa.int32()),
        ("draft_len", pa.int32()),
        ("target_text", pa.string()),
        ("draft_text", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("extra", pa.string()),  # JSON: anything else a source carries (e.g. reference captions)
        ("context_row", pa.int32()),  # the row's place in its shard's context tensors (null: none)
    ])


def row_key(sample_id: str, question_id: int) -> str:
    return f"{sample_id}#{int(question_id)}"


def split_of(sample_id: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic train/val/test split by sample id (all questions of a clip stay together)."""
    h = int.from_bytes(hashlib.sha1(sample_id.encode()).digest()[:8], "big") / 2**64
    if h < fractions[0]:
        return "train"
    if h < fractions[0] + fractions[1]:
        return "val"
    return "test"


def is_store(path: Path) -> bool:
    """A directory holding a specalign feature store's manifest (the store's own files may sit beside it)."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_manifest(path: Path, manifest: dict, expect: dict | None) -> None:
    if manifest.get("format") != FORMAT:
        raise StoreMismatch(f"{path}: not a specalign feature store (format={manifest.get('format')!r})")
    if manifest.get("format_version") not in READ_VERSIONS:
        raise StoreMismatch(
            f"{path}: store format version {manifest.get('format_version')} but this specalign reads "
            f"versions {list(READ_VERSIONS)}; re-run extract/import-pairs to rebuild it")
    if expect:
        problems = differences(expect, manifest)
        if problems:
            raise StoreMismatch(
                f"{path}: store does not match what this run expects: {describe(problems, 'expected', 'store has')}"
                "; use a store extracted with the same models/layers, or re-run `specalign extract`")



# ---------------------------------------------------------------------------------------
# integrity: CRC-32 of tensor bytes, NaN/inf found from the exponent bits

# float dtype -> (unsigned view, |bits| mask, smallest |bits| of inf/NaN: exponent all ones)
_NONFINITE = {torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
              torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
              torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000)}
CHUNK = 1 << 20   # elements per pass: a chunk stays in cache for both the CRC and the NaN/inf test


def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat unsigned numpy array (no copy for a contiguous CPU tensor)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.dtype in _NONFINITE:
        signed, unsigned, _, _ = _NONFINITE[t.dtype]
        return t.view(signed).numpy().view(unsigned)
    return t.view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy().view(np.uint8)


def scan_tensors(tensors: dict[str, torch.Tensor]) -> tuple[int, dict[str, int]]:
    """One pass over every tensor in name order -> (CRC-32 of their bytes, {name: flat index of its first
    NaN/inf}). About 1 GB/s on one core (torch.isfinite on bf16 runs at a tenth of that)."""
    crc, bad = 0, {}
    for name in sorted(tensors):
        t = tensors[name]
        raw = _raw(t)
        _, _, mask, inf = _NONFINITE.get(t.dtype, (None, None, 0, None))
        for start in range(0, raw.size, CHUNK):
            chunk = raw[start:start + CHUNK]
            crc = zlib.crc32(chunk, crc)
            if inf is not None and name not in bad and int((chunk & mask).max(initial=0)) >= inf:
                bad[name] = start + int(np.argmax((chunk & mask) >= inf))
    return crc, bad


def nonfinite_reason(rows: list[dict], tensors: dict[str, torch.Tensor], bad: dict[str, int]) -> dict[int, str]:
    """{row index: reason} for the rows (laid end to end, len(target_tokens) tokens each) whose slice of
    some tensor holds NaN or inf; `bad` from `scan_tensors` says which tensors to look at."""
    ends = np.cumsum([len(r["target_tokens"]) for r in rows])
    out: dict[int, str] = {}
    for name in sorted(bad):
        t = tensors[name]
        tokens = (~torch.isfinite(t.float().reshape(t.shape[0], -1))).any(-1).nonzero().flatten().tolist()
        for tok in tokens:
            i = int(np.searchsorted(ends, tok, side="right"))
            start = int(ends[i - 1]) if i else 0
            out.setdefault(i, f"non-finite features: {name} holds NaN or inf at token {tok - start}")
    return out


def split_context(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A shard's tensors -> (per-token rows, per-row prompt context: `features.is_context` names)."""
    context = {k: v for k, v in tensors.items() if is_context(k)}
    return {k: v for k, v in tensors.items() if k not in context}, context


def context_blocks(context: dict[str, torch.Tensor], n_rows: int) -> dict[str, torch.Tensor]:
    """Context tensors laid row after row ([n_rows * m, ...]) -> [n_rows, m, ...]; ValueError when a tensor's
    first dimension is not a multiple of the row count."""
    out = {}
    for k, v in context.items():
        if n_rows == 0 or v.shape[0] % n_rows:
            raise ValueError(f"context tensor {k} has {v.shape[0]} entries, not a whole number per row of {n_rows}")
        out[k] = v.reshape(n_rows, v.shape[0] // n_rows, *v.shape[1:])
    return out


def context_reason(n_rows: int, context: dict[str, torch.Tensor], bad: dict[str, int]) -> dict[int, str]:
    """{row index: reason} for the rows whose prompt context (see `context_blocks`) holds NaN or inf at the
    flat index `bad` gives (the first one of each tensor)."""
    out: dict[int, str] = {}
    for name in sorted(bad):
        block = context_blocks({name: context[name]}, n_rows)[name]
        for i in (~torch.isfinite(block.float().reshape(n_rows, -1))).any(-1).nonzero().flatten().tolist():
            out.setdefault(i, f"non-finite prompt context: {name} holds NaN or inf")
    return out


def drop_nonfinite(rows: list[dict], tensors: dict[str, torch.Tensor]
                   ) -> tuple[list[dict], dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Split off the rows whose features (or prompt context) hold NaN or inf: (kept rows, their tensors,
    [(key, reason)]). A long extraction skips and records them instead of writing them."""
    if not tensors:
        return rows, tensors, []
    tokens, context = split_context(tensors)
    _, bad = scan_tensors(tokens)
    _, bad_context = scan_tensors(context)
    if not bad and not bad_context:
        return rows, tensors, []
    reasons = {**context_reason(len(rows), context, bad_context), **nonfinite_reason(rows, tokens, bad)}
    ends = np.cumsum([0] + [len(r["target_tokens"]) for r in rows])
    keep = [i for i in range(len(rows)) if i not in reasons]
    kept = {k: torch.cat([v[ends[i]:ends[i + 1]] for i in keep]) if keep else v[:0] for k, v in tokens.items()}
    kept |= {k: v[keep].flatten(0, 1) for k, v in context_blocks(context, len(rows)).items()}
    errors = [(rows[i].get("key") or row_key(rows[i]["sample_id"], rows[i]["question_id"]), reasons[i])
              for i in sorted(reasons)]
    return [rows[i] for i in keep], kept, errors


def read_header(path: Path) -> tuple[bytes, dict]:
    """A safetensors file's raw header bytes and its metadata."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(n)
        if len(raw) != n:
            raise ValueError(f"header of {n} bytes, file ends after {len(raw)}")
        return raw, json.loads(raw).get("__metadata__") or {}
    except (OSError, ValueError) as e:
        raise DataError(path, f"not a readable safetensors file ({type(e).__name__}: {e})",
                        "the file is damaged or truncated") from e


def header_crc(raw: bytes) -> int:
    """CRC-32 of a safetensors header as parsed: its key order varies from process to process."""
    return zlib.crc32(json.dumps(json.loads(raw), sort_keys=True).encode())


def file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def save_checked(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """save_file, atomically, with the CRC-32 of the tensors' bytes in the metadata."""
    crc, _ = scan_tensors(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**(metadata or {}), "crc32": str(crc)})


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"manifest is not valid JSON ({e})",
                        "the store is damaged: re-run the command that wrote it") from None
    if not isinstance(manifest, dict):
        raise DataError(path, "manifest is not a JSON object", "the store is damaged: re-run the command that wrote it")
    return manifest


# ---------------------------------------------------------------------------------------
# writing


class StoreWriter:
    """Writes a store; safe to kill at any moment and to resume with the same arguments.

    Several ranks may write into one store concurrently: each writes its own shards
    (`rank` in the shard name) and only rank 0 finalizes, after all ranks are done.
    """

    def __init__(self, root: str | Path, manifest: dict, rank: int = 0):
        self.root = Path(root)
        self.rank = rank
        self.shard_dir = self.root / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                         "specalign_version": __version__, **manifest}
        mpath = self.root / "manifest.json"
        if mpath.exists():
            old = read_manifest(mpath)
            problems = differences(store_identity(self.manifest), old)
            for key in ("format_version", "context"):    # a resume never mixes rows with and without context
                if old.get(key) != self.manifest.get(key):
                    problems.append((key, self.manifest.get(key), old.get(key)))
            if problems:
                raise StoreMismatch(
                    f"{mpath}: an existing store with other settings is in the way: "
                    f"{describe(problems, 'this run has', 'store has')}; choose another `out=` or delete it")
        elif rank == 0:
            write_json(mpath, {**self.manifest, "status": "in_progress"})
        self._next = self._next_index()

    def _next_index(self) -> int:
        mine = sorted(self.shard_dir.glob(f"r{self.rank:02d}-*.safetensors"))
        return 1 + max((int(p.stem.split("-")[1]) for p in mine), default=-1)

    def done_keys(self) -> set[str]:
        """Keys already written to a shard (by any rank) or recorded as errors."""
        keys = {r["key"] for r in read_shard_rows(self.shard_dir)}
        return keys | set(self.error_keys())

    def error_keys(self) -> list[str]:
        p = self.root / "errors.jsonl"
        if not p.exists():
            return []
        return [json.loads(line)["key"] for line in p.read_text().splitlines() if line.strip()]

    def write_shard(self, rows: list[dict], tensors: dict[str, torch.Tensor] | None = None) -> str:
        """Write rows (and their concatenated hidden states) as one shard, atomically. Prompt context tensors
        (`features.is_context` names) hold each row's entries one row after the other."""
        name = f"r{self.rank:02d}-{self._next:06d}"
        offset = 0
        clean = []
        tensors, context = split_context({k: v.contiguous() for k, v in (tensors or {}).items()})
        context_blocks(context, len(rows))                        # a whole number of entries per row
        for i, r in enumerate(rows):
            r = dict(r)
            r["context_row"] = i if context else None
            r.setdefault("key", row_key(r["sample_id"], r["question_id"]))
            r["target_len"] = len(r["target_tokens"])
            r["draft_len"] = len(r["draft_tokens"])
            r["shard"] = name if tensors else None
            r["offset"] = offset if tensors else None
            offset += r["target_len"]
            clean.append(r)
        for k, v in tensors.items():
            if v.shape[0] != offset:
                raise ValueError(f"shard tensor {k} has {v.shape[0]} rows, rows need {offset}")
        if not tensors:  # tokens-only shards still carry their rows
            tensors = {"_empty": torch.zeros(0)}
        path = self.shard_dir / f"{name}.safetensors"
        _, bad = scan_tensors(tensors)
        _, bad_context = scan_tensors(context)
        if bad or bad_context:
            reasons = {**context_reason(len(clean), context, bad_context), **nonfinite_reason(clean, tensors, bad)}
            i, reason = next(iter(sorted(reasons.items())))
            raise DataError(path, f"row {clean[i]['key']}: {reason}; a store never holds non-finite features",
                            "skip such rows (store.drop_nonfinite) or fix what produced them")
        save_checked(path, {**tensors, **context}, {"rows": json.dumps(clean)})
        self._next += 1
        return name

    def record_error(self, key: str, reason: str, path: str | None = None) -> None:
        """One line of errors.jsonl: the skipped request, the file at fault (when known) and why."""
        append_line(self.root / "errors.jsonl", json.dumps({"key": key, "path": path, "reason": reason,
                                                            "rank": self.rank, "time": time.time()}))

    def save_heads(self, tensors: dict[str, torch.Tensor]) -> None:
        """Save LM heads / embeddings once (idempotent)."""
        path = self.root / "heads.safetensors"
        if path.exists():
            return
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        _, bad = scan_tensors(tensors)
        if bad:
            raise DataError(path, f"the LM heads hold NaN or inf ({sorted(bad)}): the models' weights are damaged")
        save_checked(path, tensors)

    def finalize(self, extra: dict | None = None) -> Path:
        """Rebuild rows.parquet from all shards (canonical order) and mark the store complete."""
        rows = sorted(read_shard_rows(self.shard_dir), key=lambda r: (r["sample_id"], r["question_id"]))
        seen = set()
        for r in rows:
            if r["key"] in seen:
                raise ValueError(f"{self.root}: row {r['key']} is in more than one shard")
            seen.add(r["key"])
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = row_schema()
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
        with atomic_path(self.root / "rows.parquet") as tmp:
            pq.write_table(table, tmp)
        counts = {"rows": len(rows), "tokens": int(sum(r["target_len"] for r in rows)),
                  "errors": len(set(self.error_keys())),
                  "splits": {s: sum(r["split"] == s for r in rows) for s in SPLITS}}
        manifest = {**self.manifest, **(extra or {}), "counts": counts, "checksums": self.checksums(),
                    "status": "complete"}
        write_json(self.root / "manifest.json", manifest)
        return self.root


    def checksums(self) -> dict[str, dict]:
        """{file relative to the store: its CRC-32s}: shards and heads by tensors and header, the row table
        by file. A shard written before checksums is scanned once here."""
        out = {}
        files = sorted(self.shard_dir.glob("*.safetensors")) + [p for p in [self.root / "heads.safetensors"]
                                                                 if p.exists()]
        for p in files:
            header, meta = read_header(p)
            tensors = meta.get("crc32") or str(scan_tensors(map_safetensors(p))[0])
            out[p.relative_to(self.root).as_posix()] = {"tensors": tensors, "header": str(header_crc(header))}
        out["rows.parquet"] = {"file": str(file_crc(self.root / "rows.parquet"))}
        return out


def read_shard_rows(shard_dir: Path) -> list[dict]:
    rows = []
    for p in sorted(Path(shard_dir).glob("*.safetensors")):
        rows += json.loads(read_header(p)[1]["rows"])
    return rows


# ---------------------------------------------------------------------------------------
# reading


@dataclass
class Row:
    index: int
    key: str
    sample_id: str
    question_id: int
    question: str
    split: str
    duration: str | None
    target_tokens: list[int]
    draft_tokens: list[int]
    target_text: str | None
    draft_text: str | None
    shard: str | None
    offset: int | None
    extra: dict
    context_row: int | None = None     # its place in its shard's prompt-context tensors (format 2)


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64,
                      "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one memory map of the file: nothing is read until
    touched, and a row slice copied into a batch is read once, by that copy (which runs without
    Python's global lock). The map is private copy-on-write, so the file is never written."""
    raw_header, _ = read_header(path)
    n = len(raw_header)
    header = json.loads(raw_header)
    header.pop("__metadata__", None)
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as e:
        raise DataError(path, f"not a readable safetensors file ({type(e).__name__}: {e})",
                        "the file is damaged: restore it, or write the store again") from e
    tensors = {}
    for name, info in header.items():
        try:
            start, end = (8 + n + o for o in info["data_offsets"])
            if end > raw.size or info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError("beyond the end of the file or of an unknown dtype")
            flat = torch.from_numpy(raw[start:end]).view(SAFETENSORS_DTYPES[info["dtype"]])
            tensors[name] = flat.view(info["shape"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise DataError(path, f"tensor {name!r} ({info}) does not fit the file's {raw.size} bytes ({e})",
                            "the file is truncated or damaged: restore it, or write the store again") from None
    return tensors


# shards verified by this process: (path, size, mtime) -> verified once, however many store objects read them
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_file(path: Path, tensors: dict[str, torch.Tensor], expected: dict | None,
                row_of: Callable[[int], str] | None = None) -> None:
    """Check a shard (or heads file) against its manifest checksums and for NaN/inf; DataError naming the
    file, and the row (`row_of(token index)`) of a non-finite value."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    crc, bad = scan_tensors(tensors)
    redo = "restore it from a copy, or delete it and rerun the command that wrote the store with the same out="
    if expected:
        header = header_crc(read_header(path)[0])
        if str(crc) != str(expected.get("tensors")) or str(header) != str(expected.get("header")):
            part = "tensor bytes" if str(crc) != str(expected.get("tensors")) else "header"
            raise DataError(path, f"checksum mismatch: its {part} changed after the store was written "
                            "(a damaged disk or copy)", redo)
    for name, index in sorted(bad.items()):
        t = tensors[name]
        token = index // max(1, t[0].numel()) if t.dim() > 1 else index
        where = f"row {row_of(token)}" if row_of else f"row {token}"
        raise DataError(path, f"{where}: {name} holds NaN or inf", redo)
    _VERIFIED.add(key)


class FeatureStore:
    """Read side of a store. Hidden states are memory-mapped (safetensors), never loaded whole."""

    def __init__(self, root: str | Path, expect: dict | None = None):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise DataError(mpath, "no feature store here (manifest.json missing)",
                            "run `specalign extract` or `specalign import-pairs` first")
        self.manifest = read_manifest(mpath)
        check_manifest(mpath, self.manifest, expect)
        if self.manifest.get("status") != "complete":
            raise DataError(mpath, "store is incomplete (its run was interrupted)",
                            "re-run the same command to resume and finish it")
        self.checksums: dict[str, dict] = self.manifest.get("checksums") or {}
        if not self.checksums:
            log.warning("%s: store written before shard checksums: its shards are checked for NaN/inf on "
                        "first read, not for damage", self.root)
        self.rows = [self._row(i, r) for i, r in enumerate(self._read_rows())]
        self._by_shard: dict[str, list[Row]] = {}
        for r in self.rows:
            self._by_shard.setdefault(r.shard, []).append(r)
        self._handles: dict[str, Any] = {}
        self._heads: dict[str, torch.Tensor] | None = None

    def _read_rows(self) -> list[dict]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.root / "rows.parquet"
        expected = self.checksums.get("rows.parquet", {}).get("file")
        try:
            if expected is not None and str(file_crc(path)) != str(expected):
                raise DataError(path, "checksum mismatch: the row table changed after the store was written",
                                "rerun the command that wrote the store with the same out= to rebuild it")
            return pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise DataError(path, f"unreadable row table ({' '.join(str(e).split())[:200]})",
                            "the file is truncated or damaged: rerun the command that wrote the store with the "
                            "same out= to rebuild it") from None

    @staticmethod
    def _row(i: int, r: dict) -> Row:
        return Row(index=i, key=r["key"], sample_id=r["sample_id"], question_id=r["question_id"],
                   question=r["question"], split=r["split"], duration=r.get("duration"),
                   target_tokens=list(r["target_tokens"]), draft_tokens=list(r["draft_tokens"]),
                   target_text=r.get("target_text"), draft_text=r.get("draft_text"),
                   shard=r.get("shard"), offset=r.get("offset"),
                   extra=json.loads(r["extra"]) if r.get("extra") else {}, context_row=r.get("context_row"))

    # -- selection
    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def has_hidden(self) -> bool:
        return self.manifest["kind"] == "full"

    def select(self, split: str = "all") -> list[Row]:
        if split == "all":
            return list(self.rows)
        if split not in SPLITS:
            raise ValueError(f"split must be one of train|val|test|all, got {split!r}")
        return [r for r in self.rows if r.split == split]

    def to_hf_dataset(self, split: str = "all"):
        """The row table as a Hugging Face `datasets.Dataset` (tokens, texts, splits; no hidden
        states), for analysis with the datasets toolbox (filter, map, to_pandas...)."""
        import datasets

        ds = datasets.Dataset.from_parquet(str(self.root / "rows.parquet"), keep_in_memory=True)
        return ds if split == "all" else ds.filter(lambda r: r["split"] == split)

    def layers(self, model: str) -> list[int]:
        return list(self.manifest["layers"][model])

    @property
    def context_spec(self) -> dict | None:
        """The manifest's "context" (format 2 stores from `specalign extract`): {"features": the features
        whose prompt context each row carries, "video_rows": K, "pool": how}; None without one."""
        return self.manifest.get("context")

    def context(self, row: Row, name: str) -> torch.Tensor:
        """Row's prompt context `name` (data/features.py: "prompt.target.h2" [1, H], "prompt.token" [1],
        "video.target.h2" [K, H])."""
        if row.context_row is None or row.shard is None:
            raise DataError(self.root, f"row {row.key} has no prompt context (a store without it)",
                            "re-extract with `specalign extract` (store format 2)")
        tensors = self._handle(row.shard)
        if name not in tensors:
            raise DataError(self.root / "shards" / f"{row.shard}.safetensors", f"no context tensor {name!r}",
                            f"it holds {sorted(tensors)}")
        t = tensors[name]
        per_row = t.shape[0] // max(1, len(self._by_shard[row.shard]))
        return t[row.context_row * per_row: (row.context_row + 1) * per_row]

    def feature_names(self, model: str) -> list[str]:
        """Captured EAGLE-3 low/mid/high layers (in order), then the final norm output."""
        return [feature_name(model, layer) for layer in [*self.layers(model), None]]

    # -- tensors
    def _handle(self, shard: str) -> dict[str, torch.Tensor]:
        """The shard's tensors, memory-mapped; verified (checksums, NaN/inf) on its first read."""
        if shard not in self._handles:
            p = self.root / "shards" / f"{shard}.safetensors"
            if not p.exists():
                raise DataError(p, "shard referenced by rows.parquet is missing")
            tensors = map_safetensors(p)
            verify_file(p, tensors, self.checksums.get(f"shards/{shard}.safetensors"), self._row_at(shard))
            self._handles[shard] = tensors
        return self._handles[shard]

    def _row_at(self, shard: str) -> Callable[[int], str]:
        def key(token: int) -> str:
            for r in self._by_shard.get(shard, []):
                if r.offset <= token < r.offset + len(r.target_tokens):
                    return r.key
            return f"(none: token {token} belongs to no row)"
        return key

    def verify(self) -> None:
        """Read every shard and the heads once (checksums, NaN/inf): what a first read would find, up front."""
        for shard in sorted(s for s in self._by_shard if s is not None):
            self._handle(shard)
        if self.has_hidden:
            self.heads()

    def hidden(self, row: Row, name: str) -> torch.Tensor:
        """[target_len, H] bf16 hidden states of `name` (e.g. 'target.h2', 'draft.final')."""
        if row.shard is None:
            raise DataError(self.root, f"row {row.key} has no hidden states (tokens-only store)",
                            "this consumer needs a store written by `specalign extract`")
        tensors = self._handle(row.shard)
        path = self.root / "shards" / f"{row.shard}.safetensors"
        if name not in tensors:
            raise DataError(path, f"no tensor {name!r} in this shard", f"it holds {sorted(tensors)}")
        out = tensors[name][row.offset: row.offset + len(row.target_tokens)]
        if out.shape[0] != len(row.target_tokens):
            raise DataError(path, f"row {row.key}: rows.parquet places it at tokens {row.offset}-"
                            f"{row.offset + len(row.target_tokens)}, the shard holds {tensors[name].shape[0]}",
                            "the row table does not belong to these shards: rebuild the store")
        return out

    def heads(self) -> dict[str, torch.Tensor]:
        """Both LM heads (+ the target's embeddings), read once per store object."""
        if self._heads is None:
            p = self.root / "heads.safetensors"
            if not p.exists():
                raise DataError(p, "LM heads missing from the store", "re-run `specalign extract`")
            tensors = map_safetensors(p)
            verify_file(p, tensors, self.checksums.get("heads.safetensors"))
            self._heads = {k: v.clone() for k, v in tensors.items()}
        return self._heads

    def errors(self) -> list[dict]:
        p = self.root / "errors.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        c = self.manifest.get("counts", {})
        return f"FeatureStore({self.root}, kind={self.kind}, rows={c.get('rows')}, splits={c.get('splits')})"

