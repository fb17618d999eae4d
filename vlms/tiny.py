"""A tiny target/draft pair of the real architectures, built in code (tests and the embedded default).

Same classes as the 7B models, a few hundred kB each: LLaMA decoders of width 64 and 8 layers (so the
EAGLE-3 layers 2, L/2, L-3 are distinct), CLIP towers of width 32 at small image sizes (Video-LLaVA
28 px -> 5 tokens per frame, EventGPT 56 px -> 17 tokens per frame). Both share one word-level
tokenizer with LLaMA's special ids (<unk> 0, <s> 1, </s> 2); the target's head is padded to a multiple
of 64 rows, as Video-LLaVA's 32064 rows pad the 32000-word vocabulary. The draft marks its event
placeholders with id -200 as the released EventGPT does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from specalign.vlms.eventgpt import EVENT_TOKEN_INDEX, EventChatConfig, EventChatForCausalLM
from specalign.vlms.eventgpt_backend import DRAFT_TEMPLATE
from specalign.vlms.video_llava_backend import TARGET_TEMPLATE
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, VideoLlavaConfig, VideoLlavaForConditionalGeneration

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>", "<event>"]
PUNCTUATION = [".", ",", "?", ":", "'"]
BUILTIN_WORDS = [
    "what", "is", "happening", "in", "this", "scene", "describe", "the", "objects", "and", "their", "motion",
    "color", "moving", "object", "a", "an", "small", "big", "red", "green", "blue", "circle", "square",
    "triangle", "moves", "left", "right", "up", "down", "slowly", "quickly", "across", "over", "background",
]

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
        "max_position_embeddings": 1024, "initializer_range": 0.2}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "patch_size": 14, "projection_dim": 32}
TARGET_IMAGE_SIZE = 28
DRAFT_IMAGE_SIZE = 56


def default_words() -> list[str]:
    """The synthetic world's caption vocabulary when available, else a small built-in list."""
    try:
        from specalign.data.captions import vocabulary
    except ImportError:
        return list(BUILTIN_WORDS)
    return vocabulary()


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lowercase, split on spaces and punctuation, unknown words -> <unk>.
    Ids: the special tokens first (<unk> 0, <s> 1, </s> 2, <pad> 3, <image>, <video>, <event>), then the
    punctuation, then the sorted words of `words` plus those of both prompt templates."""
    prompt_words = re.findall(r"[a-z]+", re.sub(r"<\w+>", " ", (DRAFT_TEMPLATE + TARGET_TEMPLATE).lower()))
    words = sorted({w.lower() for w in (words if words is not None else default_words())} | set(prompt_words))
    tokens = SPECIAL_TOKENS + PUNCTUATION + [w for w in words if w not in SPECIAL_TOKENS + PUNCTUATION]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[4:])


def _special_ids(tokenizer) -> dict:
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def tiny_target_config(tokenizer) -> VideoLlavaConfig:
    video_tokens_per_frame = (TARGET_IMAGE_SIZE // VISION["patch_size"]) ** 2 + 1
    vocab_size = -(-len(tokenizer) // 64) * 64
    text = {"model_type": "llama", "vocab_size": vocab_size, **TEXT, **_special_ids(tokenizer)}
    return VideoLlavaConfig(
        text_config=text,
        vision_config={"model_type": "clip_vision_model", "image_size": TARGET_IMAGE_SIZE, **VISION},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_seq_length=video_tokens_per_frame - 1,
        video_seq_length=8 * video_tokens_per_frame,
        **_special_ids(tokenizer),
    )


def tiny_draft_config(tokenizer) -> EventChatConfig:
    return EventChatConfig(
        vocab_size=len(tokenizer), **TEXT, **_special_ids(tokenizer),
        mm_hidden_size=VISION["hidden_size"],
        vision_config={"image_size": DRAFT_IMAGE_SIZE, **VISION},
        use_feature_adaptor=True,
        event_token_index=EVENT_TOKEN_INDEX,
    )


def _mute_non_text_rows(model, tokenizer) -> None:
    """Zero the LM-head rows of ids that are not text (special tokens except EOS, head padding). Like the
    untrained rows of the real heads they never win the argmax, so responses hold words and EOS only."""
    head = model.get_output_embeddings().weight
    rows = [i for i in range(head.shape[0])
            if i >= len(tokenizer) or (i in tokenizer.all_special_ids and i != tokenizer.eos_token_id)]
    with torch.no_grad():
        head[rows] = 0.0


def _seeded(build, seed: int, tokenizer):
    """build() randomly initialised from `seed` (the global RNG is left as it was), non-text rows muted."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build().eval()
    _mute_non_text_rows(model, tokenizer)
    return model


def tiny_target(seed: int, tokenizer) -> VideoLlavaForConditionalGeneration:
    return _seeded(lambda: VideoLlavaForConditionalGeneration(tiny_target_config(tokenizer)), seed, tokenizer)


def tiny_draft(seed: int, tokenizer) -> EventChatForCausalLM:
    return _seeded(lambda: EventChatForCausalLM(tiny_draft_config(tokenizer)), seed, tokenizer)


def tiny_pair(seed: int = 0, words: list[str] | None = None
              ) -> tuple[VideoLlavaForConditionalGeneration, EventChatForCausalLM, PreTrainedTokenizerFast]:
    """(target, draft, tokenizer): the target initialised from `seed`, the draft from `seed` + 1."""
    tokenizer = build_tokenizer(words)
    return tiny_target(seed, tokenizer), tiny_draft(seed + 1, tokenizer), tokenizer


def save_tiny_pair(out_dir: str | Path, seed: int = 0, words: list[str] | None = None) -> tuple[Path, Path]:
    """Write `out_dir/target` and `out_dir/draft` (model + tokenizer each), loadable by
    `VideoLlavaBackend.from_pretrained` and `EventGPTBackend.from_pretrained`; returns the two directories."""
    target, draft, tokenizer = tiny_pair(seed, words)
    dirs = Path(out_dir) / "target", Path(out_dir) / "draft"
    for model, d in zip((target, draft), dirs):
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
    return dirs
