"""`specalign import-pairs src=FILE.json out=STORE`: token-pair JSON -> tokens-only feature store.

Accepted input (docs/design.md, "Token-pair JSON"):

    {"questions": [...], "results": [{"sample_id", "query", "egpt_tokens", "egpt_text",
                                      "vl_tokens", "vl_text", ...}, ...]}

Older research files name the ids `sample_idx` / `question_idx` and the question
`question`; both spellings are read. Token lists hold generated ids only (no BOS). Any
other per-row lists (e.g. an earlier adapter's `adapter_tokens`) are kept in the row's
`extra` so that the evaluator can score them as proposals too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig
from specalign.data.store import StoreWriter, is_store, row_key, split_of

from specalign.errors import DataError
from specalign.io import claim_output
from specalign.stage import hydra_stage

TARGET_PROMPT = "USER: <video>\n{question} ASSISTANT:"
DRAFT_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions. USER: <event>\n{question} ASSISTANT:")
KNOWN = {"sample_id", "sample_idx", "query", "question", "question_idx", "egpt_tokens", "egpt_text",
         "vl_tokens", "vl_text"}


def _tokens(path: Path, i: int, row: dict, key: str, vocab: int) -> list[int]:
    toks = row.get(key)
    if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
        raise DataError(path, f"results[{i}].{key} must be a list of integer token ids")
    bad = [t for t in toks if not 0 <= t < vocab]
    if bad:
        raise DataError(path, f"results[{i}].{key} has ids outside the {vocab}-id vocabulary: {bad[:5]}")
    return toks


def read_pairs(path: str | Path, vocab_size: int = 32000, fractions=(0.8, 0.1, 0.1)) -> tuple[list[dict], dict]:
    """Parse and validate a token-pair file; returns (store rows, source info)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "token-pair file not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})") from None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list) or not results:
        raise DataError(path, "expected an object with a non-empty 'results' list (docs/design.md token-pair JSON)")
    questions = list(doc.get("questions") or [])
    rows = []
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise DataError(path, f"results[{i}] is not an object")
        sid = r.get("sample_id", r.get("sample_idx"))
        query = r.get("query", r.get("question"))
        if sid is None or query is None:
            raise DataError(path, f"results[{i}] needs 'sample_id' (or 'sample_idx') and 'query' (or 'question')")
        if query not in questions:
            questions.append(query)
        qid = r.get("question_idx", questions.index(query))
        sid = str(sid)
        extra = {k: v for k, v in r.items() if k not in KNOWN}
        rows.append({
            "key": row_key(sid, qid), "sample_id": sid, "question_id": int(qid), "question": query,
            "split": split_of(sid, fractions), "duration": doc.get("duration"),
            "target_tokens": _tokens(path, i, r, "vl_tokens", vocab_size),
            "draft_tokens": _tokens(path, i, r, "egpt_tokens", vocab_size),
            "target_text": r.get("vl_text"), "draft_text": r.get("egpt_text"),
            "extra": json.dumps(extra) if extra else None,
        })
        if not rows[-1]["target_tokens"]:
            raise DataError(path, f"results[{i}].vl_tokens is empty: nothing to align to")
    keys = [r["key"] for r in rows]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise DataError(path, f"duplicate (sample, question) rows: {sorted(dup)[:5]}")
    source = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
              "questions": questions, "config": doc.get("config"), "summary": doc.get("summary")}
    return rows, source


def import_pairs(src: str | Path, out: str | Path, vocab_size: int = 32000, target_name: str = "video_llava",
                 draft_name: str = "eventgpt", fractions=(0.8, 0.1, 0.1), max_new_tokens: int | None = None,
                 shard_rows: int = 4096) -> Path:
    rows, source = read_pairs(src, vocab_size, fractions)
    gen = (source.get("config") or {}).get("max_tokens", max_new_tokens)
    manifest = {
        "kind": "tokens",
        "target": {"name": target_name, "path": None, "config_hash": None, "vocab_size": vocab_size},
        "draft": {"name": draft_name, "path": None, "config_hash": None, "vocab_size": vocab_size},
        "layers": {"target": [], "draft": []},
        "dtype": None,
        "prompts": {"target": TARGET_PROMPT, "draft": DRAFT_PROMPT},
        "generation": {"do_sample": False, "max_new_tokens": gen},
    }
    out = claim_output(out, "import-pairs", owned_if=is_store)   # the store's identity is its manifest
    if (out / "manifest.json").exists():
        old = json.loads((out / "manifest.json").read_text())
        if old.get("source", {}).get("sha256") not in (None, source["sha256"]):
            raise DataError(out, "a store imported from another file is already here",
                            "choose another out= or delete it")
    writer = StoreWriter(out, manifest)
    done = writer.done_keys()
    todo = [r for r in rows if r["key"] not in done]
    for i in range(0, len(todo), shard_rows):
        writer.write_shard(todo[i: i + shard_rows])
    return writer.finalize({"source": source, "questions": source["questions"],
                            "split_fractions": list(fractions)})


@hydra_stage("import-pairs")
def main(cfg: DictConfig) -> None:
    from specalign.data.store import FeatureStore

    out = import_pairs(cfg.src, cfg.out, vocab_size=cfg.vocab_size, target_name=cfg.target_name,
                       draft_name=cfg.draft_name, fractions=tuple(cfg.split_fractions))
    store = FeatureStore(out)
    c = store.manifest["counts"]
    print(f"imported {c['rows']} pairs ({c['tokens']} target tokens) into {out}  splits={c['splits']}")
