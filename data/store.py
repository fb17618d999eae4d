"""The feature store: one directory per extraction (or import) run.

Layout (design.md, "Feature store"):

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

Hidden-state tensor names inside a shard: `{model}.h{idx}` for the input of decoder layer
`idx` (transformers' hidden_states[idx]) and `{model}.final` for the final norm output,
with `model` in {"target", "draft"}. Each tensor is [rows_in_shard_tokens, H]; a row's
slice is [offset, offset + target_len). Row i of a sample is the position whose next-token
prediction is target_tokens[i] (see vlms/alignment.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from specalign.data.features import feature_name

from specalign import __version__
from specalign.errors import DataError, StoreMismatch
from specalign.io import append_line, atomic_path, write_json

FORMAT = "specalign-feature-store"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")

# manifest keys that define what a store *is*; a resumed run or a consumer that expects
# different values is refused
IDENTITY_KEYS = ("kind", "target", "draft", "layers", "dtype", "prompts", "generation")

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


def _identity(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in IDENTITY_KEYS}


def _diff(expected: dict, found: dict, prefix: str = "") -> list[str]:
    out = []
    for k, e in expected.items():
        f = found.get(k) if isinstance(found, dict) else None
        if isinstance(e, dict) and isinstance(f, dict):
            out += _diff(e, f, f"{prefix}{k}.")
        elif e != f:
            out.append(f"{prefix}{k}: expected {e!r}, store has {f!r}")
    return out


def check_manifest(path: Path, manifest: dict, expect: dict | None) -> None:
    if manifest.get("format") != FORMAT:
        raise StoreMismatch(f"{path}: not a specalign feature store (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreMismatch(
            f"{path}: store format version {manifest.get('format_version')} but this specalign reads "
            f"version {FORMAT_VERSION}; re-run extract/import-pairs to rebuild it")
    if expect:
        problems = _diff(expect, manifest)
        if problems:
            raise StoreMismatch(
                f"{path}: store does not match what this run expects:\n  " + "\n  ".join(problems)
                + "\nUse a store extracted with the same models/layers, or re-run `specalign extract`.")


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
            old = json.loads(mpath.read_text())
            problems = _diff(_identity(self.manifest), old)
            if problems:
                raise StoreMismatch(
                    f"{mpath}: an existing store with other settings is in the way:\n  "
                    + "\n  ".join(problems) + "\nChoose another `out=` or delete that directory.")
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
        """Write rows (and their concatenated hidden states) as one shard, atomically."""
        name = f"r{self.rank:02d}-{self._next:06d}"
        offset = 0
        clean = []
        for r in rows:
            r = dict(r)
            r.setdefault("key", row_key(r["sample_id"], r["question_id"]))
            r["target_len"] = len(r["target_tokens"])
            r["draft_len"] = len(r["draft_tokens"])
            r["shard"] = name if tensors else None
            r["offset"] = offset if tensors else None
            offset += r["target_len"]
            clean.append(r)
        tensors = {k: v.contiguous() for k, v in (tensors or {}).items()}
        for k, v in tensors.items():
            if v.shape[0] != offset:
                raise ValueError(f"shard tensor {k} has {v.shape[0]} rows, rows need {offset}")
        if not tensors:  # tokens-only shards still carry their rows
            tensors = {"_empty": torch.zeros(0)}
        meta = {"rows": json.dumps(clean)}
        with atomic_path(self.shard_dir / f"{name}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        self._next += 1
        return name

    def record_error(self, key: str, reason: str) -> None:
        append_line(self.root / "errors.jsonl",
                    json.dumps({"key": key, "reason": reason, "rank": self.rank, "time": time.time()}))

    def save_heads(self, tensors: dict[str, torch.Tensor]) -> None:
        """Save LM heads / embeddings once (idempotent)."""
        path = self.root / "heads.safetensors"
        if path.exists():
            return
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))

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
                  "errors": len(self.error_keys()),
                  "splits": {s: sum(r["split"] == s for r in rows) for s in SPLITS}}
        manifest = {**self.manifest, **(extra or {}), "counts": counts, "status": "complete"}
        write_json(self.root / "manifest.json", manifest)
        return self.root


def read_shard_rows(shard_dir: Path) -> list[dict]:
    rows = []
    for p in sorted(Path(shard_dir).glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            rows += json.loads(f.metadata()["rows"])
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


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64,
                      "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one memory map of the file: nothing is read until
    touched, and a row slice copied into a batch is read once, by that copy (which runs without
    Python's global lock). The map is private copy-on-write, so the file is never written."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        raw = np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as e:
        raise DataError(path, f"not a readable safetensors file ({type(e).__name__}: {e})",
                        "the shard is damaged: delete it and rerun `specalign extract` to write it again") from e
    tensors = {}
    for name, info in header.items():
        start, end = (8 + n + o for o in info["data_offsets"])
        if end > raw.size or info["dtype"] not in SAFETENSORS_DTYPES:
            raise DataError(path, f"tensor {name!r} ({info['dtype']}, bytes {start}-{end}) lies beyond the "
                            f"file's {raw.size} bytes or has an unknown dtype",
                            "the shard is truncated: delete it and rerun `specalign extract`")
        flat = torch.from_numpy(raw[start:end]).view(SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = flat.view(info["shape"])
    return tensors


class FeatureStore:
    """Read side of a store. Hidden states are memory-mapped (safetensors), never loaded whole."""

    def __init__(self, root: str | Path, expect: dict | None = None):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise DataError(mpath, "no feature store here (manifest.json missing)",
                            "run `specalign extract` or `specalign import-pairs` first")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise DataError(mpath, f"manifest is not valid JSON ({e})") from None
        check_manifest(mpath, self.manifest, expect)
        if self.manifest.get("status") != "complete":
            raise DataError(mpath, "store is incomplete (its run was interrupted)",
                            "re-run the same command to resume and finish it")
        import pyarrow.parquet as pq

        table = pq.read_table(self.root / "rows.parquet")
        self.rows = [self._row(i, r) for i, r in enumerate(table.to_pylist())]
        self._handles: dict[str, Any] = {}
        self._heads: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _row(i: int, r: dict) -> Row:
        return Row(index=i, key=r["key"], sample_id=r["sample_id"], question_id=r["question_id"],
                   question=r["question"], split=r["split"], duration=r.get("duration"),
                   target_tokens=list(r["target_tokens"]), draft_tokens=list(r["draft_tokens"]),
                   target_text=r.get("target_text"), draft_text=r.get("draft_text"),
                   shard=r.get("shard"), offset=r.get("offset"),
                   extra=json.loads(r["extra"]) if r.get("extra") else {})

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

    def feature_names(self, model: str) -> list[str]:
        """Captured EAGLE-3 low/mid/high layers (in order), then the final norm output."""
        return [feature_name(model, layer) for layer in [*self.layers(model), None]]

    # -- tensors
    def _handle(self, shard: str) -> dict[str, torch.Tensor]:
        if shard not in self._handles:
            p = self.root / "shards" / f"{shard}.safetensors"
            if not p.exists():
                raise DataError(p, "shard referenced by rows.parquet is missing")
            self._handles[shard] = map_safetensors(p)
        return self._handles[shard]

    def hidden(self, row: Row, name: str) -> torch.Tensor:
        """[target_len, H] bf16 hidden states of `name` (e.g. 'target.h2', 'draft.final')."""
        if row.shard is None:
            raise DataError(self.root, f"row {row.key} has no hidden states (tokens-only store)",
                            "this consumer needs a store written by `specalign extract`")
        tensors = self._handle(row.shard)
        if name not in tensors:
            raise DataError(self.root / "shards" / f"{row.shard}.safetensors", f"no tensor {name!r} in this shard",
                            f"it holds {sorted(tensors)}")
        return tensors[name][row.offset: row.offset + len(row.target_tokens)]

    def heads(self) -> dict[str, torch.Tensor]:
        """Both LM heads (+ the target's embeddings), read once per store object."""
        if self._heads is None:
            p = self.root / "heads.safetensors"
            if not p.exists():
                raise DataError(p, "LM heads missing from the store", "re-run `specalign extract`")
            with safe_open(str(p), framework="pt") as f:
                self._heads = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open has no __iter__
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

