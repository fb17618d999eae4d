"""What a feature store *is*, and the one comparison of two such identities.

A store's identity is the part of its manifest that decides what its rows mean: both models
(name, architecture hash, a fingerprint of their weights, sizes, quantisation), the captured
layers, the dtype, the prompts and the generation settings. Every drafter records the identity
of the store it was trained on (`source_store` in its config.json); `train` records it in its run
directory. Consumers compare with `differences` and refuse with `check_drafter_store`.

A key that one side does not know (None, missing, or an empty list, e.g. the layers of a tokens-only
store, or a weights fingerprint older than fingerprints) is not compared: it cannot tell two stores
apart. Sizes (vocab_size, hidden_size) are compared whenever both sides know them and no override
allows a difference: a drafter cannot run on other sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from specalign.errors import DataError, StoreMismatch

log = logging.getLogger("specalign")

# manifest keys that define what a store is; a resumed run or a consumer that expects other values refuses it
IDENTITY_KEYS = ("kind", "target", "draft", "layers", "dtype", "prompts", "generation")
# what a drafter depends on: not the kind (a TokenAdapter reads tokens of either kind) nor the generation
# settings (another max_new_tokens is another store of the same models)
DRAFTER_KEYS = ("target", "draft", "layers", "dtype", "prompts")
# where the files live is no part of what they are
VOLATILE = ("path",)
SIZE_KEYS = ("vocab_size", "hidden_size")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def store_identity(manifest: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> dict:
    return {k: manifest.get(k) for k in keys}


def run_identity(manifest: dict, adapter: str) -> dict:
    """What a training run directory is: the drafter kind and the store it trains on."""
    return {"adapter": adapter, "store": store_identity(manifest)}


def _known(v: Any) -> bool:
    return v is not None and v != [] and v != {}


def differences(expected: dict, found: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """[(dotted key, expected value, found value)] where both sides know the key and disagree."""
    out = []
    for k, e in expected.items():
        f = found.get(k) if isinstance(found, dict) else None
        if k in VOLATILE or not (_known(e) and _known(f)):
            continue
        if isinstance(e, dict) and isinstance(f, dict):
            out += differences(e, f, f"{prefix}{k}.")
        elif e != f:
            out.append((f"{prefix}{k}", e, f))
    return out


def describe(diffs: list[tuple[str, Any, Any]], expected: str = "expected", found: str = "found") -> str:
    """One line: `key: expected X, found Y; ...` (long values shortened)."""
    def short(v):
        text = json.dumps(v, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return "; ".join(f"{k}: {expected} {short(e)}, {found} {short(f)}" for k, e, f in diffs)


def is_size(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in SIZE_KEYS


# ---------------------------------------------------------------------------------------- weights

def weights_fingerprint(source) -> str:
    """A short fingerprint of a model's weights: of a checkpoint directory, each weight file's name, size
    and 16 sampled 64 KiB blocks (a few MB read, not the whole 14 GB); of an in-memory module (the tiny
    pair built from a seed), every parameter's values."""
    h = hashlib.sha256()
    if isinstance(source, str | Path):
        files = sorted(p for p in Path(source).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        for p in files:
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            with open(p, "rb") as f:
                for k in range(16):
                    f.seek(k * max(size - 65536, 0) // 15)
                    h.update(f.read(65536))
    else:
        for name, t in sorted(source.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- drafters

def read_drafter_config(path: str | Path) -> dict:
    """A drafter directory's config.json; one-line DataError when it is missing or not JSON."""
    p = Path(path) / "config.json"
    if not p.is_file():
        raise DataError(p, "missing from the drafter directory", "run `specalign export run=RUN out=DIR`")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(p, f"not valid JSON ({e})", "export the drafter again") from None
    if not isinstance(cfg, dict):
        raise DataError(p, "not a drafter config (a JSON object is expected)", "export the drafter again")
    return cfg


def drafter_shapes(cfg: dict) -> dict[str, Any]:
    """What the drafter's weights fix about the store, as store manifest keys: {"target.vocab_size": V, ...}
    and "features": the feature names it reads with their summed width "fc_in"."""
    if cfg.get("speculators_model_type") == "eagle3":
        layer = cfg.get("transformer_layer_config") or {}
        ids = cfg.get("eagle_aux_hidden_state_layer_ids") or []
        return {"target.vocab_size": layer.get("vocab_size"), "target.hidden_size": layer.get("hidden_size"),
                "features": [f"target.h{i}" for i in ids]}
    c = cfg.get("config") or {}
    if cfg.get("drafter_type") == "eagle3":
        return {"target.vocab_size": c.get("vocab_size"), "target.hidden_size": c.get("hidden_size"),
                "features": list(c.get("feature_names") or []), "fc_in": c.get("fc_in_features")}
    return {"target.vocab_size": c.get("vocab_size")}


def _manifest_value(manifest: dict, key: str):
    model, _, field = key.partition(".")
    return (manifest.get(model) or {}).get(field)


def shape_problems(cfg: dict, manifest: dict) -> list[str]:
    """Where a drafter's weights cannot run on the store at all (no override helps)."""
    shapes, out = drafter_shapes(cfg), []
    for key, want in shapes.items():
        have = _manifest_value(manifest, key) if "." in key else None
        if want is not None and have is not None and want != have:
            out.append(f"{key}: drafter {want}, store {have}")
    names, fc_in = shapes.get("features") or [], shapes.get("fc_in")
    if names and fc_in is not None and manifest.get("kind") == "full":
        widths = [_manifest_value(manifest, f"{n.split('.')[0]}.hidden_size") for n in names]
        if None not in widths and sum(widths) != fc_in:
            out.append(f"features {names}: drafter reads {fc_in} values per row, the store has {sum(widths)}")
    return out


def check_drafter_store(path: str | Path, manifest: dict, store_root: str | Path,
                        allow_mismatch: bool = False) -> None:
    """Refuse a drafter on a store other than the one it was trained on, listing what differs.

    Sizes must match always; other differences (other models, weights, layers, prompts) only with
    `allow_mismatch` (allow_store_mismatch=true), which then logs them."""
    cfg = read_drafter_config(path)
    where = f"drafter {path} on store {store_root}"
    sizes = shape_problems(cfg, manifest)
    recorded = (cfg.get("source_store") or {}).get("identity")
    diffs = differences(store_identity(recorded, DRAFTER_KEYS), store_identity(manifest, DRAFTER_KEYS)) \
        if recorded else []
    hard = [f"{k}: drafter trained on {e!r}, store has {f!r}" for k, e, f in diffs if is_size(k)]
    if sizes or hard:
        raise StoreMismatch(f"{where}: the drafter cannot run on this store: " + "; ".join(sizes + hard))
    soft = [d for d in diffs if not is_size(d[0])]
    if not recorded:
        log.warning("%s: the drafter records no store identity (exported elsewhere or by an older "
                    "specalign): only its sizes were checked", where)
    elif soft and not allow_mismatch:
        raise StoreMismatch(f"{where}: trained on a store of other models or settings: "
                            f"{describe(soft, 'trained on', 'store has')} (use a store of the same models, "
                            "or pass allow_store_mismatch=true to evaluate it anyway)")
    elif soft:
        log.warning("%s: allow_store_mismatch=true, evaluating despite: %s", where,
                    describe(soft, "trained on", "store has"))
