"""EventGPT's backend: the model on the event frames of a clip (implements vlms.base.VLMBackend);
`kind: eventgpt` in conf/models/*.yaml. Built as the draft of the pair by default."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from specalign.data.samples import Request
from specalign.vlms.base import Batch
from specalign.vlms.eventgpt import EventChatForCausalLM, num_event_tokens
from specalign.vlms.hf_backend import (
    HFBackend,
    check_model_dir,
    dense_modules,
    load_pretrained,
)
from specalign.vlms.registry import load_options, register_backend

from specalign.errors import DataError

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
EVENT_PLACEHOLDER = "<event>"
DRAFT_TEMPLATE = VICUNA_SYSTEM + " USER: " + EVENT_PLACEHOLDER + "\n{question} ASSISTANT:"
TOWER = "model.visual_tower"
DENSE_MODULES = ("lm_head", "model.visual_projector", "model.feature_adaptor")  # never 4-bit


@register_backend
class EventGPTBackend(HFBackend):
    kind = name = "eventgpt"
    role = "draft"

    @property
    def decoder(self):
        return self.model.model

    def prompt_template(self) -> str:
        return DRAFT_TEMPLATE

    def prompt_ids(self, question: str, num_frames: int) -> list[int]:
        """As EventGPT tokenises: the text around `<event>` tokenised apart (BOS on the first part only),
        the placeholder id repeated once per pooled event token (T + N)."""
        before, after = DRAFT_TEMPLATE.format(question=question).split(EVENT_PLACEHOLDER, 1)
        head = self.tokenizer(before).input_ids
        tail = self.tokenizer(after, add_special_tokens=False).input_ids
        n_event = num_event_tokens(self.model.config, num_frames)
        return head + [self.model.config.event_token_index] * n_event + tail

    def prepare(self, requests: list[Request], on_host: bool = False, media_map=map) -> Batch:
        """Event PNGs -> [B, T, 3, S, S] CLIP input (S from the tower config), prompts left padded (on_host,
        media_map: vlms/base.py)."""
        from specalign.data.dsec import read_event_images

        for r in requests:
            if not r.sample.event_images:
                raise DataError(r.sample.id, "sample has no event images")
        frames = self.clip_frames(requests, lambda s: read_event_images(s.event_images), media_map)
        counts = {len(f) for f in frames.values()}
        if len(counts) > 1:
            raise ValueError(f"event frame counts differ within one batch ({sorted(counts)}): batch clips "
                             "with the same number of event images")
        prompts = [self.prompt_ids(r.question, len(frames[r.sample.id])) for r in requests]
        media = torch.stack([frames[r.sample.id] for r in requests])
        return self.make_batch(requests, prompts, {"event_tensors": media}, on_host)

    @classmethod
    def from_pretrained(cls, path: str | Path, quant: str = "bf16", quantize_towers: bool = False,
                        device: str | torch.device = "cpu", compute_dtype: torch.dtype = torch.bfloat16,
                        quantize_head: bool = False, kv_cache: str = "static", fallback_tokenizer=None
                        ) -> EventGPTBackend:
        """EventGPT and its tokenizer from a local checkpoint directory.

        quant: "bf16" | "fp32" | "nf4". With nf4 the LLaMA decoder is 4-bit; the CLIP tower (unless
        `quantize_towers`), projector, feature adaptor and LM head (unless `quantize_head`) stay in
        `compute_dtype`. kv_cache: see `HFBackend`. Without tokenizer files beside the checkpoint,
        `fallback_tokenizer` (the target's: the same LLaMA vocabulary) serves when config.json gives the BOS
        and EOS ids it supplies and they agree (`draft_tokenizer`).
        """
        path = check_model_dir(path, "EventGPT")
        keep_dense = dense_modules(DENSE_MODULES, [TOWER], quantize_towers, quantize_head)
        model = load_pretrained(EventChatForCausalLM, path, quant, keep_dense, device, compute_dtype)
        tokenizer = draft_tokenizer(path, model.config, fallback_tokenizer)
        return cls(model, tokenizer, path=path, quant=quant, kv_cache=kv_cache)

    @classmethod
    def from_config(cls, path: str, cfg: Mapping, device, fallback_tokenizer=None) -> EventGPTBackend:
        """With the keys of a conf/models entry (vlms/registry.py); a tokenizer beside EventGPT is optional."""
        return cls.from_pretrained(path, device=device, fallback_tokenizer=fallback_tokenizer, **load_options(cfg))

    @staticmethod
    def tiny_model(seed: int, tokenizer) -> torch.nn.Module:
        from specalign.vlms.tiny import tiny_draft

        return tiny_draft(seed, tokenizer)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def draft_tokenizer(path: Path, config, fallback=None):
    """The tokenizer beside the checkpoint, else `fallback` when the config's special ids match it."""
    from transformers import AutoTokenizer

    if any((path / name).is_file() for name in TOKENIZER_FILES) or fallback is None:
        return AutoTokenizer.from_pretrained(path)
    ids = {k: getattr(config, f"{k}_token_id", None) for k in ("bos", "eos")}
    theirs = {k: getattr(fallback, f"{k}_token_id", None) for k in ("bos", "eos")}
    if None in ids.values() or ids != theirs:
        raise DataError(path, f"no tokenizer beside the checkpoint, and its config.json's ids {ids} do not give "
                        f"the target tokenizer's {theirs}", "copy the tokenizer files next to config.json")
    return fallback
