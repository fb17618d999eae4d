"""Video-LLaVA's backend: the model on the clip's video (implements vlms.base.VLMBackend); `kind: video_llava`
in conf/models/*.yaml. Built as the target of the pair by default."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from specalign.data.samples import Request
from specalign.vlms.base import Batch
from specalign.vlms.hf_backend import HFBackend
from specalign.vlms.registry import load_options, register_backend
from specalign.vlms.video_llava import load_video_llava, video_tokens_per_frame

from specalign.errors import DataError

VIDEO_PLACEHOLDER = "<video>"
TARGET_TEMPLATE = "USER: " + VIDEO_PLACEHOLDER + "\n{question} ASSISTANT:"
NUM_FRAMES = 8


@register_backend
class VideoLlavaBackend(HFBackend):
    kind = name = "video_llava"
    role = "target"
    num_frames = NUM_FRAMES

    @property
    def decoder(self):
        return self.model.model.language_model

    def prompt_template(self) -> str:
        return TARGET_TEMPLATE

    def prompt_ids(self, question: str) -> list[int]:
        """As VideoLlavaProcessor does: the whole prompt tokenised (BOS first), its one `<video>` token
        expanded to frames x tokens-per-frame video tokens."""
        ids = self.tokenizer(TARGET_TEMPLATE.format(question=question)).input_ids
        video = self.model.config.video_token_index
        if ids.count(video) != 1:
            raise DataError(self.path or "tokenizer", f"the prompt must hold one {VIDEO_PLACEHOLDER} token "
                            f"(id {video}), found {ids.count(video)}", hint="tokenizer and config disagree")
        at = ids.index(video)
        n_video = self.num_frames * video_tokens_per_frame(self.model.config)
        return ids[:at] + [video] * n_video + ids[at + 1:]

    def prepare(self, requests: list[Request], on_host: bool = False, media_map=map) -> Batch:
        """8 uniformly spaced video frames -> [B, 8, 3, S, S] CLIP input (S from the tower config, 224),
        prompts left padded (on_host, media_map: vlms/base.py)."""
        from specalign.data.video import read_video_frames

        frames = self.clip_frames(requests, lambda s: read_video_frames(s.video_path, self.num_frames), media_map)
        prompts = [self.prompt_ids(r.question) for r in requests]
        media = torch.stack([frames[r.sample.id] for r in requests])
        return self.make_batch(requests, prompts, {"pixel_values_videos": media}, on_host)

    @classmethod
    def from_pretrained(cls, path: str | Path, quant: str = "bf16", quantize_towers: bool = False,
                        load_image_tower: bool = False, device: str | torch.device = "cpu",
                        compute_dtype: torch.dtype = torch.bfloat16, quantize_head: bool = False,
                        kv_cache: str = "static") -> VideoLlavaBackend:
        """Video-LLaVA and its tokenizer from a local checkpoint directory (see `load_video_llava`;
        kv_cache: see `HFBackend`)."""
        from transformers import AutoTokenizer

        model = load_video_llava(path, quant, quantize_towers, load_image_tower, device, compute_dtype, quantize_head)
        return cls(model, AutoTokenizer.from_pretrained(path), path=path, quant=quant, kv_cache=kv_cache)

    @classmethod
    def from_config(cls, path: str, cfg: Mapping, device, fallback_tokenizer=None) -> VideoLlavaBackend:
        """With the keys of a conf/models entry (vlms/registry.py); its tokenizer is always in the checkpoint."""
        return cls.from_pretrained(path, load_image_tower=bool(cfg.get("load_image_tower", False)), device=device,
                                   **load_options(cfg))

    @staticmethod
    def tiny_model(seed: int, tokenizer) -> torch.nn.Module:
        from specalign.vlms.tiny import tiny_target

        return tiny_target(seed, tokenizer)
