"""The 7B configurations of both models, built in code (benchmarks with random weights, size checks).

    Video-LLaVA-7B   Vicuna-7B v1.5 decoder (LLaMA-7B, vocabulary 32064) + CLIP ViT-L/14 at 224 px video tower
                     + projector 1024 -> 4096 -> 4096; the image tower is not built (video never uses it)
    EventGPT-7B      Vicuna-7B v1.5 decoder (LLaMA-7B, vocabulary 32000) + CLIP ViT-L/14 at 336 px
                     + projector 1024 -> 4096 -> 4096 + feature adaptor 4096 -> 4096

Special token ids default to the released checkpoints' and can be replaced (a benchmark with another
tokenizer passes its own). `random_pair` builds both models with random weights for the benchmarks.
"""

from __future__ import annotations

import contextlib

import torch
from specalign.vlms.eventgpt import (
    CLIP_VIT_L_14_336,
    EVENT_TOKEN_INDEX,
    EventChatConfig,
    EventChatForCausalLM,
)
from torch import nn
from transformers import VideoLlavaConfig

LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}
CLIP_VIT_L_14_224 = {**CLIP_VIT_L_14_336, "image_size": 224}
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def video_llava_7b_config(video_token_index: int = 32001, image_token_index: int = 32000,
                          special_ids: dict | None = None) -> VideoLlavaConfig:
    ids = {**SPECIAL_IDS, **(special_ids or {})}
    tokens_per_frame = (224 // 14) ** 2 + 1
    return VideoLlavaConfig(
        text_config={"model_type": "llama", "vocab_size": 32064, **LLAMA_7B, **ids},
        vision_config={"model_type": "clip_vision_model", **CLIP_VIT_L_14_224},
        video_token_index=video_token_index,
        image_token_index=image_token_index,
        image_seq_length=tokens_per_frame - 1,
        video_seq_length=8 * tokens_per_frame,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **ids,
    )


def eventgpt_7b_config(event_token_index: int = EVENT_TOKEN_INDEX, special_ids: dict | None = None
                       ) -> EventChatConfig:
    return EventChatConfig(
        vocab_size=32000, **LLAMA_7B, **{**SPECIAL_IDS, **(special_ids or {})},
        mm_hidden_size=CLIP_VIT_L_14_336["hidden_size"],
        vision_config=dict(CLIP_VIT_L_14_336),
        use_feature_adaptor=True,
        event_token_index=event_token_index,
    )


# ------------------------------------------------------------------------------- random weights

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_model(cls, config, device, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`cls(config)` with its random initialisation done on `device`, in `dtype`."""
    with torch.device(device), default_dtype(dtype):
        return cls(config).eval()


def random_pair(models: str, device, dtype: torch.dtype = torch.bfloat16):
    """(target, draft, tokenizer) with random weights: `models` "tiny" (vlms.tiny's pair) or "real" (the 7B
    configurations with the tiny pair's word-level tokenizer; the LM-head rows of its special ids but EOS
    zeroed, so that no response holds a media placeholder)."""
    from specalign.vlms.tiny import build_tokenizer, tiny_pair
    from specalign.vlms.video_llava import VideoLlavaForVideo

    if models == "tiny":
        target, draft, tokenizer = tiny_pair(0)
        return target.to(device, dtype), draft.to(device, dtype), tokenizer
    tokenizer = build_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    target = random_model(VideoLlavaForVideo, video_llava_7b_config(
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), special_ids=ids), device, dtype)
    draft = random_model(EventChatForCausalLM, eventgpt_7b_config(special_ids=ids), device, dtype)
    special = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
    with torch.no_grad():
        for model in (target, draft):
            model.get_output_embeddings().weight[special] = 0.0
    return target, draft, tokenizer
