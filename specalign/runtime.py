"""What a run sets of the process: seeds derived from the run's seed, and torch's threads.

`derived_seed` is the one formula for a training step's randomness and for a request's sampling draws,
so each is a function of (seed, where it is) only and a resumed or reordered run draws the same numbers.
`torch_threads` sets the intra-op threads for a block and restores them after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_WEIGHTS = (1009, 31, 1)   # of the counters, last one first: (step, micro-batch, rank) or (request,)


def derived_seed(seed: int, *counters: int) -> int:
    """(seed * 1_000_003 + the counters weighted 1009, 31, 1 from the right) mod 2**63.

    derived_seed(seed, step, micro, rank): a training step's seed (train/modules.py);
    derived_seed(seed, request): a request's sampling generator (specdec/online_eval.py)."""
    if len(counters) > len(_WEIGHTS):
        raise ValueError(f"at most {len(_WEIGHTS)} counters, got {len(counters)}")
    weights = _WEIGHTS[len(_WEIGHTS) - len(counters):]
    return (int(seed) * 1_000_003 + sum(w * int(c) for w, c in zip(weights, counters))) % 2**63


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n inside the block, restored after it (tiny models run fastest on
    one thread of a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
