"""Self-describing drafter directories: `config.json` + `model.safetensors`.

Native layout (any drafter):
    config.json        {"format": "specalign-drafter", "drafter_type", "config": {...all fields},
                        "vocab": {...}, "source_store": {...}, ...extra}
    model.safetensors  the module's state dict (EAGLE-3: d2t and t2d inside)

Speculators layout (EAGLE-3 with feature_source=target only), the one vLLM loads:
    config.json        speculators_model_type "eagle3", transformer_layer_config (a LlamaConfig),
                       draft_vocab_size, eagle_aux_hidden_state_layer_ids, norm_before_residual,
                       speculators_config {algorithm, proposal_methods, default_proposal_method, verifier}
    model.safetensors  fc.weight, layers.0.*, norm.weight, lm_head.weight, embed_tokens.weight, d2t, t2d

`load_drafter` reads both and needs nothing but adapters/*.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from specalign.adapters.drafter_files import load_checked
from specalign.adapters.eagle3 import Eagle3Config, Eagle3Drafter
from specalign.adapters.token_adapter import TokenAdapter, TokenAdapterConfig
from torch import nn

from specalign.errors import SpecalignError
from specalign.io import atomic_path, write_json

FORMAT = "specalign-drafter"
FORMAT_VERSION = 1
DRAFTERS: dict[str, tuple[type[nn.Module], type]] = {
    "token_adapter": (TokenAdapter, TokenAdapterConfig),
    "eagle3": (Eagle3Drafter, Eagle3Config),
}


def drafter_type(model: nn.Module) -> str:
    for name, (cls, _) in DRAFTERS.items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"not a drafter: {type(model).__name__}")


def build_drafter(kind: str, config: dict) -> nn.Module:
    cls, cfg_cls = DRAFTERS[kind]
    return cls(cfg_cls.from_dict(config))


def _vocab_info(model: nn.Module) -> dict:
    c = model.config
    if isinstance(model, Eagle3Drafter):
        return {"target_vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size,
                "maps": "d2t (int64 [draft], target = draft + d2t[draft]) and t2d (bool [target]) "
                        "in model.safetensors"}
    return {"vocab_size": c.vocab_size, "sep_id": c.sep_id}


def _save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def save_drafter(model: nn.Module, out_dir: str | Path, extra: dict | None = None,
                 format: str = "native") -> Path:
    """Write a drafter directory; `extra` (e.g. source_store, run) goes into config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if format == "speculators":
        config = speculators_config(model, extra or {})
    elif format == "native":
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "drafter_type": drafter_type(model),
                  "config": model.config.to_dict(), "vocab": _vocab_info(model), **(extra or {})}
    else:
        raise ValueError(f"format must be native or speculators, got {format!r}")
    _save_weights(model, out / "model.safetensors")
    write_json(out / "config.json", config)
    return out


def speculators_config(model: nn.Module, extra: dict) -> dict:
    """The speculators/vLLM config.json of an EAGLE-3 drafter fed by target features."""
    if not isinstance(model, Eagle3Drafter) or model.config.feature_source != "target":
        raise SpecalignError("the speculators format holds EAGLE-3 drafters with feature_source=target only")
    c = model.config
    layer = c.llama_config().to_diff_dict()
    layer.pop("transformers_version", None)
    layer.update(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=c.rope_theta)
    target = extra.get("source_store", {}).get("identity", {}).get("target") or {}
    verifier_arch = target.get("architectures", ["VideoLlavaForConditionalGeneration"])
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer,
        "draft_vocab_size": c.draft_vocab_size,
        "norm_before_residual": c.norm_before_residual,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.ttt_steps,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": extra.get("verifier") or target.get("path"),
                         "architectures": verifier_arch},
        },
        "source_store": extra.get("source_store"),   # the store it was trained on (specalign.identity)
    }


def _config_from_speculators(cfg: dict, state: dict) -> Eagle3Config:
    layer = cfg["transformer_layer_config"]
    theta = layer.get("rope_theta", (layer.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    ids = list(cfg["eagle_aux_hidden_state_layer_ids"])
    return Eagle3Config(
        hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"],
        num_attention_heads=layer["num_attention_heads"],
        num_key_value_heads=layer.get("num_key_value_heads", layer["num_attention_heads"]),
        rms_norm_eps=layer["rms_norm_eps"], rope_theta=theta,
        max_position_embeddings=layer["max_position_embeddings"], vocab_size=layer["vocab_size"],
        draft_vocab_size=cfg["draft_vocab_size"], feature_source="target",
        feature_names=[f"target.h{i}" for i in ids], fc_in_features=state["fc.weight"].shape[1],
        aux_layer_ids=ids, norm_before_residual=cfg["norm_before_residual"],
        ttt_steps=cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"])


def load_drafter(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A drafter directory (native or speculators) -> the module, in eval mode, with `propose`."""
    return load_checked(path, _build_from_files).to(device).eval()   # one-line errors for damaged files


def _build_from_files(cfg: dict, state: dict) -> nn.Module:
    if cfg.get("speculators_model_type") == "eagle3":
        return Eagle3Drafter(_config_from_speculators(cfg, state))
    if cfg.get("format") == FORMAT and cfg.get("drafter_type") in DRAFTERS:
        return build_drafter(cfg["drafter_type"], cfg["config"])
    raise ValueError("not a specalign or speculators EAGLE-3 drafter config")
