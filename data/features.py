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
