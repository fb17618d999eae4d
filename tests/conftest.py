"""Shared test helpers. Real data samples live beside the project in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models: one intra-op thread is far faster than several on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_file(name: str) -> Path:
    """Path of a real data sample, or skip the test with the reason."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real data sample {name} not found in ../shared/data (it lives outside the project)")
    return p


# The longest files (seconds of tests on 2 cores, measured: 227, 140, 115, 98, 67, 53, 51), in that order before
# all others: with two workers taking a file at a time (pyproject's addopts keep this order), the last files
# left are short ones and both workers finish together.
LONGEST_FIRST = ("test_pipeline.py", "test_online_eval.py", "test_extract.py", "test_online.py", "test_teach.py",
                 "test_train_stage.py", "test_train_failures.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))          # stable: the rest keep their order
