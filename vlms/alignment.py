"""Position alignment between response tokens and feature rows: the one place it is defined.

For target response tokens r_0..r_{n-1} placed after a prompt of length P (sequence
positions P..P+n-1), feature row i is the hidden state at the input position whose
next-token prediction is r_i, i.e. position P - 1 + i. Row 0 is the last prompt position;
the last response token's own position (P + n - 1) is never a feature row.

With left padding, a batch row padded by `pad` tokens shifts every position by `pad`.
The draft model is run teacher-forced on the *target's* response after its own prompt, so
its rows come from the same rule with its own prompt length and line up one to one.
"""

from __future__ import annotations

import torch


def feature_positions(prompt_len: int, n_response: int, pad: int = 0) -> torch.Tensor:
    """Sequence positions of the n feature rows: [pad + P - 1, ..., pad + P + n - 2]."""
    start = pad + prompt_len - 1
    return torch.arange(start, start + n_response)


def teacher_forced_inputs(prompt_ids: list[int], response: list[int]) -> list[int]:
    """Input ids for the teacher-forced pass: the prompt, then all but the last response token.

    Its last position is P + n - 2, the last feature row; nothing after it is needed."""
    return list(prompt_ids) + list(response[:-1])


def gather_rows(hidden: torch.Tensor, prompt_lens: list[int], n_responses: list[int],
                pads: list[int] | None = None) -> list[torch.Tensor]:
    """hidden: [B, T, H] -> per batch row, [n_b, H] feature rows (row i predicts r_i)."""
    pads = pads or [0] * len(prompt_lens)
    out = []
    for b, (P, n, pad) in enumerate(zip(prompt_lens, n_responses, pads)):
        idx = feature_positions(P, n, pad).to(hidden.device)
        out.append(hidden[b].index_select(0, idx))
    return out


# ------------------------------------------------------------------------------------------ prompt context
# What a drafter reads of the prompt (data/features.py, "prompt context"), defined here for extraction and
# the online engine alike. EAGLE-3 pairs the feature at position t with the token at t + 1 to predict the
# token at t + 2; to propose r_0 (at position P) it pairs the feature at P - 2 with the last prompt token.

def prompt_row_position(prompt_len: int, pad: int = 0) -> int:
    """Sequence position of the prompt row: the prompt position before the last one (P - 2)."""
    if prompt_len < 2:
        raise ValueError(f"a prompt row needs a prompt of 2 tokens at least, got {prompt_len}")
    return pad + prompt_len - 2


def video_summary(hidden: torch.Tensor, ids: torch.Tensor, video_id: int, groups: int) -> torch.Tensor:
    """hidden [L, H] over prompt ids [L] -> [groups, H] float32: the mean of the hidden states at the video
    token positions over `groups` equal contiguous runs of them (one per frame: the target lays its video
    tokens out frame by frame). Padding never holds the video id, so left padding needs no offset."""
    positions = (ids == video_id).nonzero().flatten()
    if len(positions) < groups:
        raise ValueError(f"{len(positions)} video positions in the prompt, a summary of {groups} needs more")
    return torch.stack([hidden[p].float().mean(0) for p in positions.to(hidden.device).tensor_split(groups)])
