"""Store loaders: the prefetch thread hands over the same batches as the plain loader, and worker
processes the same as both; errors reach the consumer; leaving early stops the thread."""

import threading

import pytest
import torch
from conftest_train import LAYERS, make_store
from specalign.train.datamodule import FeatureDataModule, Prefetcher, TokenPairDataModule

NAMES = [f"target.h{i}" for i in LAYERS]


def batches(loader) -> list[dict]:
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected) > 1
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for k in e:
            assert torch.equal(g[k], e[k]), k


@pytest.mark.parametrize("kind", ["features", "tokens"])
def test_prefetched_batches_equal_plain_and_worker_batches(tmp_path, kind):
    store = str(make_store(tmp_path / "s", n_train=11))

    def data(**kw):
        if kind == "features":
            return FeatureDataModule(store, NAMES, batch_size=3, seed=4, **kw)
        return TokenPairDataModule(store, batch_size=3, seed=4, **kw)

    threaded = data()
    assert isinstance(threaded.train_dataloader(), Prefetcher)
    plain = batches(data(prefetch=0).train_dataloader())
    assert_same(batches(threaded.train_dataloader()), plain)
    assert_same(batches(data(num_workers=1).train_dataloader()), plain)
    assert len(threaded.train_dataloader()) == len(plain) == 4                  # 11 rows in batches of 3


def test_prefetcher_raises_the_producer_error():
    def broken():
        yield {"x": torch.zeros(1)}
        raise ValueError("shard 3 is truncated")

    it = iter(Prefetcher(broken(), depth=2))
    assert torch.equal(next(it)["x"], torch.zeros(1))
    with pytest.raises(ValueError, match="shard 3 is truncated"):
        next(it)


def test_leaving_early_stops_the_thread():
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield len(produced)

    it = iter(Prefetcher(endless(), depth=2))
    assert [next(it) for _ in range(3)] == [1, 2, 3]
    it.close()
    assert not any(t.name == "specalign-prefetch" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1                                           # at most depth + 1 ahead
