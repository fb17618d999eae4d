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


def pytest_collection_modifyitems(items):
    """Tests marked slow first (a stable sort): with two workers the longest file starts at once, beside the
    others, instead of being the last one left."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
