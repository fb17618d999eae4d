"""VLM backends by model, and the (target, draft) pair of a `conf/models/*.yaml` config.

A backend class (vlms/base.py's interface, e.g. vlms/hf_backend.py's HFBackend) is registered under its
`kind` with `@register_backend`; `models.target.kind` and `models.draft.kind` pick the two. A kind not
registered yet is looked up as the module `specalign.vlms.<kind>_backend`, which registers it on import:
a third VLM is that module (plus its model code, where transformers has none) and a conf/models entry.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from specalign.errors import DataError
from specalign.registry import Registry

ROLES = ("target", "draft")
DEFAULT_KINDS = {"target": "video_llava", "draft": "eventgpt"}   # models.<role>.kind when a config has none

BACKENDS: Registry[type] = Registry("VLM", "models.<role>.kind", "specalign.vlms.{}_backend")


def register_backend(cls: type) -> type:
    """Class decorator: `cls.kind` names a VLM backend (with `from_config` and `tiny_model`)."""
    BACKENDS.add(cls.kind, cls)
    return cls


def backend_class(kind: str, key: str | None = None) -> type:
    return BACKENDS.get(kind, key)


def load_options(cfg: Mapping) -> dict:
    """The loading keys of a conf/models entry that every backend's `from_pretrained` takes."""
    return {"quant": cfg.get("quant", "bf16"), "compute_dtype": getattr(torch, cfg.get("dtype", "bfloat16")),
            "quantize_towers": bool(cfg.get("quantize_towers", False)),
            "quantize_head": bool(cfg.get("quantize_heads", False)), "kv_cache": cfg.get("kv_cache", "static")}


def kind_of(cfg: Mapping, role: str) -> str:
    return (cfg.get(role) or {}).get("kind") or DEFAULT_KINDS[role]


def build_backends(cfg: Mapping, device: str | torch.device | None = None) -> tuple:
    """cfg keys: `target.kind`, `draft.kind` (the VLM of each role); `tiny` (build each kind's tiny model in
    memory from `seed`), else `target.path`, `draft.path` (local checkpoint directories); `quant` ("bf16" |
    "fp32" | "nf4"), `dtype` (compute dtype of nf4 and its unquantised modules), `quantize_towers`,
    `quantize_heads` (nf4: the LM heads in 4-bit too), `load_image_tower`, `kv_cache` ("static" | "dynamic" |
    "offloaded", see HFBackend), `device` (overridden by `device`). -> (target, draft) backends."""
    device = device if device is not None else cfg.get("device", "cpu")
    if cfg.get("tiny"):
        return _tiny_backends(cfg, device)
    out = []
    for role in ROLES:
        cls = backend_class(kind_of(cfg, role), f"models.{role}.kind")
        # a tokenizer beside the second model is optional: the first one's may serve (EventGPT's is LLaMA's)
        backend = cls.from_config(_path(cfg, role), cfg, device, fallback_tokenizer=out[0].tokenizer if out else None)
        backend.role = role
        out.append(backend)
    return tuple(out)


def _path(cfg: Mapping, role: str) -> str:
    path = (cfg.get(role) or {}).get("path")
    if path in (None, "", "???"):
        raise DataError(f"models.{role}.path", "no checkpoint directory given",
                        hint=f"set models.{role}.path=/local/dir/of/the/{role}/model")
    return str(path)


def _tiny_backends(cfg: Mapping, device) -> tuple:
    """The tiny models of vlms/tiny.py: one shared tokenizer, the target's weights from `seed`, the draft's
    from `seed` + 1."""
    from specalign.vlms.tiny import build_tokenizer

    quant, seed = cfg.get("quant", "bf16"), int(cfg.get("seed", 0))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if quant not in dtypes:
        raise ValueError(f"the in-memory tiny pair takes quant fp32 or bf16, got {quant!r} "
                         "(for nf4, write it with vlms.tiny.save_tiny_pair and give its paths)")
    tokenizer = build_tokenizer()
    out = []
    for offset, role in enumerate(ROLES):
        cls = backend_class(kind_of(cfg, role), f"models.{role}.kind")
        model = cls.tiny_model(seed + offset, tokenizer).to(device, dtypes[quant])
        backend = cls(model, tokenizer, quant=quant, kv_cache=cfg.get("kv_cache", "static"))
        backend.role = role
        out.append(backend)
    return tuple(out)
