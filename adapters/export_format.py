"""Self-describing drafter directories: `config.json` + `model.safetensors`.

Native layout (any drafter type):
    config.json        {"format": "specalign-drafter", "drafter_type", "config": {...all fields},
                        "vocab": {...}, "source_store": {...}, ...extra}
    model.safetensors  the module's state dict (EAGLE-3: d2t and t2d inside)

Speculators layout (where the type has one: EAGLE-3 with feature_source=target), the one vLLM loads:
    config.json        speculators_model_type "eagle3", transformer_layer_config (a LlamaConfig),
                       draft_vocab_size, eagle_aux_hidden_state_layer_ids, norm_before_residual,
                       speculators_config {algorithm, proposal_methods, default_proposal_method, verifier}
    model.safetensors  fc.weight, layers.0.*, norm.weight, lm_head.weight, embed_tokens.weight, d2t, t2d

What each type writes and reads beyond the common part comes from its registered type
(adapters/registry.py: `vocab_info`, `to_speculators`, `from_speculators`); the speculators model type
names the drafter type. `load_drafter` reads both and needs nothing but adapters/*.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from specalign.adapters.registry import drafter_type, type_of
from torch import nn

from specalign.errors import DataError
from specalign.io import atomic_path, write_json

FORMAT = "specalign-drafter"
FORMAT_VERSION = 1
FORMATS = ("native", "speculators")


def build_drafter(kind: str, config: dict) -> nn.Module:
    return drafter_type(kind).build(config)


def _save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def save_drafter(model: nn.Module, out_dir: str | Path, extra: dict | None = None,
                 format: str = "native") -> Path:
    """Write a drafter directory; `extra` (e.g. source_store, run) goes into config.json."""
    if format not in FORMATS:
        raise ValueError(f"format must be native or speculators, got {format!r}")
    kind = type_of(model)
    if format == "speculators":
        config = kind.to_speculators(model, extra or {})
    else:
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "drafter_type": kind.kind,
                  "config": model.config.to_dict(), "vocab": kind.vocab_info(model), **(extra or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(model, out / "model.safetensors")
    write_json(out / "config.json", config)
    return out


def load_drafter(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A drafter directory (native or speculators) -> the module, in eval mode."""
    path = Path(path)
    cpath, wpath = path / "config.json", path / "model.safetensors"
    for p in (cpath, wpath):
        if not p.exists():
            raise DataError(p, "missing from the drafter directory", "run `specalign export` to write one")
    cfg = json.loads(cpath.read_text())
    state = load_file(str(wpath))
    if cfg.get("speculators_model_type"):
        model = drafter_type(cfg["speculators_model_type"]).from_speculators(cfg, state)
    elif cfg.get("format") == FORMAT and cfg.get("drafter_type"):
        model = build_drafter(cfg["drafter_type"], cfg["config"])
    else:
        raise DataError(cpath, "not a specalign or speculators drafter config")
    model.load_state_dict(state)
    return model.to(device).eval()
