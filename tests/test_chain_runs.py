"""Batched greedy simulation: the rounds read off `chain_runs` (a few batched forwards over every position of
every row) are exactly the rounds of the round-by-round walk, in which the drafter's own `propose` drafts
each round from the accepted prefix (`simulate_greedy`, the metric's definition)."""

from types import SimpleNamespace

import pytest
import torch
from conftest_train import LAYERS, H, V
from specalign.adapters.eagle3 import Eagle3Config, Eagle3Drafter, build_vocab_maps
from specalign.adapters.token_adapter import TokenAdapter, TokenAdapterConfig, TokenAdapterType
from specalign.specdec.metrics import rounds_from_runs, simulate_greedy
from specalign.train.datamodule import pad

GAMMAS = (1, 3, 5)


def responses_near(next_token, lengths, seed: int) -> list[list[int]]:
    """Responses that follow the drafter's own greedy token most of the time (next_token(b, prefix), None
    where it proposes nothing) and a random one otherwise: runs of every length, from every position."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, n in enumerate(lengths):
        r: list[int] = []
        while len(r) < n:
            tok = next_token(b, r)
            follow = tok is not None and float(torch.rand(1, generator=g)) < 0.75
            r.append(tok if follow else int(torch.randint(3, V, (1,), generator=g)))
        out.append(r)
    return out


def assert_same_rounds(model, contexts, responses, batch):
    runs = model.chain_runs(batch, max(GAMMAS))
    accepted = 0
    for b, (context, r) in enumerate(zip(contexts, responses)):
        for gamma in GAMMAS:
            expected = simulate_greedy(r, lambda p, g, c=context, r=r: model.propose(c, r[:p], g)[0], gamma)
            assert rounds_from_runs(*runs.row(b, len(r)), len(r), gamma) == expected, (b, gamma)
            accepted += sum(x.accepted for x in expected)
    assert accepted > 20, "the responses should hold long accepted runs"


@pytest.mark.parametrize("condition_on_draft", [True, False])
def test_token_adapter_rounds_from_one_teacher_forced_pass(condition_on_draft):
    """Rows of several lengths in one padded batch, one of them longer than max_len (the drafter proposes
    nothing from there on), the draft kept or dropped."""
    torch.manual_seed(0)
    c = TokenAdapterConfig(vocab_size=V, n_layer=2, d_model=32, n_head=2, d_ff=64, max_len=12, dropout=0.0,
                           condition_on_draft=condition_on_draft)
    model = TokenAdapter(c).eval()
    g = torch.Generator().manual_seed(1)
    drafts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 9, 0, 14)]
    responses = responses_near(lambda b, r: model.propose(drafts[b], r, 1)[0][0] if len(r) < c.max_len else None,
                               (7, 12, 10, 17), seed=2)
    rows = [SimpleNamespace(draft_tokens=d, target_tokens=r) for d, r in zip(drafts, responses)]
    for keep in (True, False):
        batch = TokenAdapterType().batch(model, None, rows, keep_draft=keep)
        assert_same_rounds(model, drafts if keep else [[]] * len(drafts), responses, batch)


@pytest.mark.parametrize("feature_source", ["target", "both"])
def test_eagle3_rounds_from_depth_batched_unroll_steps(feature_source):
    """EAGLE-3 unrolls on its own hidden states: `depth` passes, step k at every position at once."""
    torch.manual_seed(0)
    width = 3 * H if feature_source == "target" else 3 * H + 3 * 16
    c = Eagle3Config(hidden_size=H, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=V, draft_vocab_size=16, feature_source=feature_source, fc_in_features=width,
                     aux_layer_ids=LAYERS, ttt_steps=3)
    model = Eagle3Drafter(c).eval()
    d2t, t2d = build_vocab_maps(torch.arange(V).flip(0), 16)
    model.d2t.copy_(d2t)
    model.t2d.copy_(t2d)
    g = torch.Generator().manual_seed(1)
    lengths = (6, 11, 2, 9)
    feats = [torch.randn(n, width, generator=g).to(torch.bfloat16) for n in lengths]
    responses = responses_near(lambda b, r: (model.propose(feats[b], r, 1)[0] or [None])[0], lengths, seed=3)
    batch = {"tokens": pad([torch.tensor(r) for r in responses]), "length": torch.tensor(lengths), "feats": pad(feats)}
    assert_same_rounds(model, feats, responses, batch)
