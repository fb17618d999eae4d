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

from pathlib import Path

import torch
from safetensors.torch import save_file
from specalign.adapters.drafter_files import load_checked
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
    return load_checked(path, _build_from_files).to(device).eval()   # one-line errors for damaged files


def _build_from_files(cfg: dict, state: dict) -> nn.Module:
    kind = cfg.get("speculators_model_type") or (cfg.get("drafter_type") if cfg.get("format") == FORMAT else None)
    if not kind:
        raise ValueError("not a specalign or speculators drafter config")
    try:
        drafter = drafter_type(kind)
    except DataError as e:
        raise ValueError(e.problem) from None
    return drafter.from_speculators(cfg, state) if cfg.get("speculators_model_type") else drafter.build(cfg["config"])
