"""The streaming draft (specdec/schedule.py): which EventGPT tokens a round sees under the concurrent schedule,
the batched walk with a per-query cut against the round-by-round walk, online against offline, and the report
rows that state each drafter's schedule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from specalign.adapters.token_adapter import (
    DraftResponse,
    TokenAdapter,
    TokenAdapterConfig,
    TokenAdapterModule,
    TokenAdapterType,
)
from specalign.specdec.drafters import ReportDrafter
from specalign.specdec.fast_drafters import TokenAdapterProposer
from specalign.specdec.metrics import rounds_from_runs, simulate_greedy
from specalign.specdec.offline import schedule_section
from specalign.specdec.online import greedy_generate, speculative_generate
from specalign.specdec.online_drafters import OnlineDrafter
from specalign.specdec.report import markdown_table
from specalign.specdec.schedule import (
    CONCURRENT,
    SEQUENTIAL,
    StreamCosts,
    draft_tokens_by,
    e2e_speedup,
    visible_length,
)
from test_online import EOS, VOCAB, perturbed, tiny_llama

from specalign.errors import SpecalignError

# a round every 5 ms from 10 ms on; EventGPT's first token at 12 ms, then one every 4 ms
COSTS = {"target_prefill_s": 0.010, "target_decode_s": 0.004, "verify_s": 0.004, "round_s": 0.001,
         "draft_prefill_s": 0.012, "draft_step_s": 0.004}


def streaming_adapter(seed: int = 0, vocab: int = VOCAB, max_len: int = 40) -> TokenAdapter:
    """A random streaming TokenAdapter with its draft gate and copy pointer open (so that the draft matters)."""
    torch.manual_seed(seed)
    c = TokenAdapterConfig(vocab_size=vocab, n_layer=2, d_model=32, n_head=2, d_ff=64, max_len=max_len, dropout=0.0,
                           draft_schedule="streaming", stream_costs=COSTS)
    model = TokenAdapter(c).eval()
    with torch.no_grad():
        model.gate.fill_(1.0)
        model.copy_gate.bias.fill_(0.0)
    return model


def round_by_round(model, draft, response, gamma):
    """`simulate_greedy` with round i proposing from draft[:visible_length(i)] (propose is called once a round)."""
    costs, calls = model.stream_costs, []

    def propose(p, g):
        calls.append(p)
        return model.propose(draft[: visible_length(costs, len(calls) - 1)], response[:p], g)[0]
    return simulate_greedy(response, propose, gamma)


def test_visible_length_is_what_the_schedule_says():
    costs = StreamCosts.from_dict(COSTS)
    # round i starts at 10 + 5i ms; tokens at t: 0 before 12 ms, then 1 + floor((t - 12) / 4)
    assert [visible_length(costs, i) for i in range(6)] == [0, 1, 3, 4, 5, 6]
    assert [draft_tokens_by(costs, t) for t in (0.0119, 0.012, 0.0159, 0.016)] == [0, 1, 1, 2]
    assert visible_length(costs, 5, draft_len=2) == 2
    # online, the drafter's context at round i is that cut of EventGPT's response
    inputs = DraftResponse(True, costs)
    inputs.begin(SimpleNamespace(request=list(range(100, 110))))
    seen = []
    for _ in range(6):
        seen.append(len(inputs.context([])))
        inputs.observe([1], None)
    assert seen == [0, 1, 3, 4, 5, 6] and inputs.schedule == CONCURRENT
    assert DraftResponse(True).schedule == SEQUENTIAL and DraftResponse(False, costs).schedule is None


def test_end_to_end_speedup_of_each_schedule():
    c = StreamCosts.from_dict(COSTS)
    plain = 0.010 + 9 * 0.004                                    # 10 tokens
    assert e2e_speedup(2.0, 10, c, CONCURRENT) == pytest.approx(plain / (0.010 + 5 * 0.005))
    assert e2e_speedup(2.0, 10, c, None) == e2e_speedup(2.0, 10, c, CONCURRENT)
    setup = 0.012 + 7 * 0.004                                    # an 8-token response generated first
    assert e2e_speedup(2.0, 10, c, SEQUENTIAL, 8) == pytest.approx(plain / (0.010 + setup + 5 * 0.005))
    with pytest.raises(SpecalignError, match="adapter.stream_costs"):
        StreamCosts.from_dict({"verify": 0.1})
    with pytest.raises(SpecalignError, match="draft_schedule"):
        TokenAdapterConfig(draft_schedule="later")


def walked_response(model, draft, n, gamma, g):
    """A response whose walk at `gamma` accepts long runs: each round keeps a random prefix of the drafter's own
    streaming proposal, then a token it did not propose."""
    costs, r, i = model.stream_costs, [], 0
    while len(r) < n:
        prop = model.propose(draft[: visible_length(costs, i)], r, gamma)[0]
        k = 0
        while k < len(prop) and float(torch.rand(1, generator=g)) < 0.8:
            k += 1
        wrong = int(torch.randint(3, VOCAB, (1,), generator=g))
        if k < len(prop) and wrong == prop[k]:
            wrong = 3 + (wrong - 2) % (VOCAB - 3)
        r, i = r + prop[:k] + [wrong], i + 1
    return r[:n]


def test_batched_streaming_walk_is_the_round_by_round_walk():
    """The per-query cut scores every position at once, and the passes until the walked rounds agree give exactly
    the rounds of proposing round by round from the visible draft; rows of several lengths, one empty draft, one
    response past max_len."""
    model = streaming_adapter(max_len=30)
    g = torch.Generator().manual_seed(1)
    drafts = [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in (6, 12, 0, 20)]
    responses = [walked_response(model, d, n, 3, g) for d, n in zip(drafts, (10, 20, 14, 33))]
    rows = [SimpleNamespace(draft_tokens=d, target_tokens=r) for d, r in zip(drafts, responses)]
    batch = TokenAdapterType().batch(model, None, rows)
    accepted, cut_matters = 0, False
    for gamma in (1, 3, 5):
        runs = model.chain_runs(batch, gamma)
        for b, (d, r) in enumerate(zip(drafts, responses)):
            expected = round_by_round(model, d, r, gamma)
            assert rounds_from_runs(*runs.row(b, len(r)), len(r), gamma) == expected, (b, gamma)
            accepted += sum(x.accepted for x in expected)
            if gamma == 3:
                full = simulate_greedy(r, lambda p, gm, d=d, r=r: model.propose(d, r[:p], gm)[0], gamma)
                cut_matters |= full != expected
    assert accepted > 40 and cut_matters, "the responses should accept long runs, and the cut should change some"


def test_training_sees_the_schedules_cut():
    """Streaming training: each position sees what the schedule gives at its round under a drawn rate of tokens
    per round (at most what a one-token round sees, at least the start's)."""
    model = streaming_adapter()
    target = torch.randint(3, VOCAB, (4, 12))
    visible = model.sampled_visible(target, train=True)
    costs = model.stream_costs
    assert visible.shape == target.shape
    slowest = torch.tensor([visible_length(costs, j) for j in range(12)])     # one token a round
    assert (visible <= slowest).all() and (visible[:, 0] == 0).all() and (visible.diff(dim=1) >= 0).all()
    module = TokenAdapterModule(model.config.to_dict(), {"lr": 1e-3}, {"kind": "constant"})
    batch = {"draft": torch.randint(3, VOCAB, (4, 9)), "draft_len": torch.tensor([9, 5, 0, 9]), "target": target,
             "target_len": torch.tensor([12, 10, 12, 7])}
    assert torch.isfinite(module.losses(batch, train=True)["loss"])


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(0)
    draft = perturbed(target, 1, 0.02)
    g = torch.Generator().manual_seed(2)
    return target, draft, [torch.randint(2, VOCAB, (1, n), generator=g) for n in (5, 9)]


@pytest.mark.parametrize("fast", [False, True])
def test_online_streaming_equals_offline(pair, fast):
    """Online (eager, and the static-shape proposer that re-encodes a grown draft), round i proposes from the
    tokens the schedule gives it, and the rounds equal the offline batched walk over the online output."""
    target, draft, prompts = pair
    model = streaming_adapter()
    costs = model.stream_costs
    proposed = 0
    for prompt in prompts:
        response = greedy_generate(draft, {"input_ids": prompt}, 20, EOS).tokens
        drafter = OnlineDrafter(model, lambda: TokenAdapterType().online_inputs(model, None),
                                static=TokenAdapterProposer(model) if fast else None)
        run = speculative_generate(target, {"input_ids": prompt}, drafter, gamma=3, max_new_tokens=24,
                                   eos_token_id=EOS, request=response)
        assert run.tokens == greedy_generate(target, {"input_ids": prompt}, 24, EOS).tokens
        for i, r in enumerate(run.log):
            cut = response[: visible_length(costs, i)]
            assert r.proposal == model.propose(cut, run.tokens[: r.start], len(r.proposal))[0], i
            proposed += len(r.proposal)
        rows = [SimpleNamespace(draft_tokens=response, target_tokens=run.tokens)]
        runs = model.chain_runs(TokenAdapterType().batch(model, None, rows), 3)
        assert rounds_from_runs(*runs.row(0, len(run.tokens)), len(run.tokens), 3) == run.rounds
    assert proposed > 0


def test_report_rows_state_their_schedule():
    model = streaming_adapter()
    kind = TokenAdapterType()
    drafters = [ReportDrafter("drafter", model, kind), ReportDrafter("no_draft", model, kind, {"keep_draft": False})]
    rows = [SimpleNamespace(draft_tokens=[5] * 8, target_tokens=[4] * 10)] * 2
    results = {name: {"3": {"tau": 2.0}} for name in ("drafter", "no_draft")}
    section = schedule_section(drafters, rows, results, [3])
    assert section["drafter"]["schedule"] == CONCURRENT and section["no_draft"]["schedule"] == "none"
    assert section["drafter"]["projected_e2e"]["3"] == pytest.approx(
        e2e_speedup(2.0, 10, model.stream_costs, CONCURRENT))
    report = {"gammas": [3], "results": {n: {"3": {"tau": 2.0, "alpha": 0.5, "alpha_at": [0.5] * 3, "samples": 2}}
                                         for n in results}, "projected_by_schedule": section}
    md = markdown_table(report)
    assert "| drafter | concurrent |" in md and "| no_draft | none |" in md
