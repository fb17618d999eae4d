"""Names of captured hidden states: the one home of "target.h4" and "draft.final".

    {model}.h{i}     the input of decoder layer i of `model` (transformers' hidden_states[i])
    {model}.final    the output of its final norm (the LM head's input)

with `model` "target" or "draft". The store's shards, the EAGLE-3 drafters' `feature_names` and the
online drafters' requests for target / draft hidden states all use these names.
"""

from __future__ import annotations

import re

from specalign.errors import DataError

MODELS = ("target", "draft")
FINAL = "final"
_NAME = re.compile(r"(target|draft)\.(?:h(\d+)|final)")


def layer_key(layer: int | None) -> str:
    """A model's own name of a captured state: "h{i}", or "final" for layer None (vlms/hf_backend.py)."""
    return FINAL if layer is None else f"h{int(layer)}"


def feature_name(model: str, layer: int | None) -> str:
    """("target", 4) -> "target.h4"; ("draft", None) -> "draft.final"."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return f"{model}.{layer_key(layer)}"


def parse_feature(name: str) -> tuple[str, int | None]:
    """"target.h4" -> ("target", 4); "draft.final" -> ("draft", None)."""
    match = _NAME.fullmatch(name)
    if not match:
        raise DataError(name, "not a feature name", "expected '<target|draft>.h<layer>' or '<target|draft>.final'")
    return match[1], None if match[2] is None else int(match[2])


# ---------------------------------------------------------------------------------------------- prompt context
# Per response row, what the prompt holds for a drafter that reads it (the store's "context", format 2):
#
#     prompt.{feature}   [1, H]  `feature` (e.g. "target.h2") at the prompt position before the last one: the
#                                feature EAGLE-3 pairs with the last prompt token to propose r_0
#     prompt.token       [1]     that last prompt token (int64)
#     video.{feature}    [K, H]  `feature` at the video positions, mean-pooled over K equal contiguous groups
#                                (one per frame: the target lays its video tokens out frame by frame)

PROMPT, VIDEO = "prompt", "video"
CONTEXT_KINDS = (PROMPT, VIDEO)
PROMPT_TOKEN = f"{PROMPT}.token"


def context_name(kind: str, feature: str) -> str:
    """("prompt", "target.h2") -> "prompt.target.h2"; ("video", "target.h2") -> "video.target.h2"."""
    if kind not in CONTEXT_KINDS:
        raise ValueError(f"context kind must be one of {CONTEXT_KINDS}, got {kind!r}")
    parse_feature(feature)
    return f"{kind}.{feature}"


def is_context(name: str) -> bool:
    """A store tensor holding per-row prompt context (not per-token rows)."""
    return name.split(".", 1)[0] in CONTEXT_KINDS
