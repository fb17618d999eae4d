"""Video-LLaVA (the target model) through transformers' `VideoLlavaForConditionalGeneration`.

Module paths in transformers 5 (used to keep modules out of 4-bit quantisation):

    model.video_tower             CLIP ViT-L/14 at 224 px; a video of 8 frames gives 8 x 257 tokens (CLS kept)
    model.image_tower             a second CLIP tower for still images: never used for video
    model.multi_modal_projector   linear_1, GELU, linear_2
    model.language_model          LLaMA decoder (embed_tokens, layers, norm)
    lm_head
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from specalign.vlms.hf_backend import check_model_dir, dense_modules, load_pretrained
from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

TOWERS = ("model.video_tower", "model.image_tower")
DENSE_MODULES = ("lm_head", "model.multi_modal_projector")  # never 4-bit


class VideoLlavaForVideo(VideoLlavaForConditionalGeneration):
    """Video-LLaVA without its image tower: video inputs never use it, so its weights are not loaded."""

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"image_tower\."]

    def __init__(self, config: VideoLlavaConfig):
        super().__init__(config)
        del self.model.image_tower


# transformers renames the keys of older Video-LLaVA checkpoints (`language_model.model.*`, `video_tower.*`)
# only for its own classes: give this subclass the same renaming.
register_checkpoint_conversion_mapping(VideoLlavaForVideo.__name__, get_checkpoint_conversion_mapping("video_llava"),
                                       overwrite=True)


def video_tokens_per_frame(config: VideoLlavaConfig) -> int:
    """Tokens one frame contributes: (S / patch)^2 patches + CLS (257 at 224/14)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def load_video_llava(path: str | Path, quant: str = "bf16", quantize_towers: bool = False,
                     load_image_tower: bool = False, device: str | torch.device = "cpu",
                     compute_dtype: torch.dtype = torch.bfloat16,
                     quantize_head: bool = False) -> VideoLlavaForConditionalGeneration:
    """Video-LLaVA from a local checkpoint directory.

    quant: "bf16" | "fp32" | "nf4". With nf4 the LLaMA decoder is 4-bit; the vision towers (unless
    `quantize_towers`), the projector and the LM head (unless `quantize_head`) stay in `compute_dtype`.
    load_image_tower: keep the (unused for video) image tower; off by default to save its memory.
    """
    path = check_model_dir(path, "Video-LLaVA")
    keep_dense = dense_modules(DENSE_MODULES, TOWERS, quantize_towers, quantize_head)
    cls = VideoLlavaForConditionalGeneration if load_image_tower else VideoLlavaForVideo
    return load_pretrained(cls, path, quant, keep_dense, device, compute_dtype)
