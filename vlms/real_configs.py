"""The 7B configurations of both models, built in code (benchmarks with random weights, size checks).

    Video-LLaVA-7B   Vicuna-7B v1.5 decoder (LLaMA-7B, vocabulary 32064) + CLIP ViT-L/14 at 224 px video tower
                     + projector 1024 -> 4096 -> 4096; the image tower is not built (video never uses it)
    EventGPT-7B      Vicuna-7B v1.5 decoder (LLaMA-7B, vocabulary 32000) + CLIP ViT-L/14 at 336 px
                     + projector 1024 -> 4096 -> 4096 + feature adaptor 4096 -> 4096

Special token ids default to the released checkpoints' and can be replaced (a benchmark with another
tokenizer passes its own).
"""

from __future__ import annotations

from specalign.vlms.eventgpt import CLIP_VIT_L_14_336, EVENT_TOKEN_INDEX, EventChatConfig
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
