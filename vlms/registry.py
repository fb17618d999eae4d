"""Build the (target, draft) backend pair from a `conf/models/*.yaml` config."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from specalign.vlms.draft_backend import DraftBackend, load_draft
from specalign.vlms.target_backend import TargetBackend, load_target

from specalign.errors import DataError


def build_backends(cfg: Mapping, device: str | torch.device | None = None) -> tuple[TargetBackend, DraftBackend]:
    """cfg keys: `tiny` (build vlms.tiny's pair in memory from `seed`), else `target.path`, `draft.path`
    (local checkpoint directories); `quant` ("bf16" | "fp32" | "nf4"), `dtype` (compute dtype of nf4 and
    its unquantised modules), `quantize_towers`, `quantize_heads` (nf4: the LM heads in 4-bit too),
    `load_image_tower`, `kv_cache` ("static" | "dynamic" | "offloaded", see HFBackend), `device`
    (overridden by `device`)."""
    device = device if device is not None else cfg.get("device", "cpu")
    quant = cfg.get("quant", "bf16")
    kv_cache = cfg.get("kv_cache", "static")
    if cfg.get("tiny"):
        return _tiny_backends(cfg.get("seed", 0), quant, device, kv_cache)
    compute_dtype = getattr(torch, cfg.get("dtype", "bfloat16"))
    towers, heads = bool(cfg.get("quantize_towers", False)), bool(cfg.get("quantize_heads", False))
    target = load_target(_path(cfg, "target"), quant, towers, bool(cfg.get("load_image_tower", False)), device,
                         compute_dtype, heads, kv_cache)
    draft = load_draft(_path(cfg, "draft"), quant, towers, device, compute_dtype, heads, kv_cache,
                       fallback_tokenizer=target.tokenizer)   # a tokenizer beside EventGPT is optional
    return target, draft


def _path(cfg: Mapping, role: str) -> str:
    path = (cfg.get(role) or {}).get("path")
    if path in (None, "", "???"):
        raise DataError(f"models.{role}.path", "no checkpoint directory given",
                        hint=f"set models.{role}.path=/local/dir/of/the/{role}/model")
    return str(path)


def _tiny_backends(seed: int, quant: str, device, kv_cache: str) -> tuple[TargetBackend, DraftBackend]:
    from specalign.vlms.tiny import tiny_pair

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if quant not in dtypes:
        raise ValueError(f"the in-memory tiny pair takes quant fp32 or bf16, got {quant!r} "
                         "(for nf4, write it with vlms.tiny.save_tiny_pair and give its paths)")
    target, draft, tokenizer = tiny_pair(seed)
    return (TargetBackend(target.to(device, dtypes[quant]), tokenizer, quant=quant, kv_cache=kv_cache),
            DraftBackend(draft.to(device, dtypes[quant]), tokenizer, quant=quant, kv_cache=kv_cache))
