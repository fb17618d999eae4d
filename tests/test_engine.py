"""The fast engine on the CPU (graphs off): the static KV cache, the drafters' static-shape rounds, the replay
drafter and its traces, and the one-line errors. CUDA graphs and compilation replay the same functions on a GPU
(bench/specdec.py checks their outputs there)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from specalign.adapters.eagle3 import Eagle3Config, Eagle3Drafter, FeatureInputs, PromptRows
from specalign.adapters.token_adapter import DraftResponse, TokenAdapter, TokenAdapterConfig
from specalign.specdec.engine import StaticDecoder
from specalign.specdec.fast_drafters import Eagle3Proposer, TokenAdapterProposer
from specalign.specdec.metrics import Acceptance, simulate_greedy
from specalign.specdec.online import (
    ModelDrafter,
    TokenListDrafter,
    greedy_generate,
    make_engine,
    speculative_generate,
)
from specalign.specdec.online_drafters import OnlineDrafter
from specalign.specdec.replay import (
    ReplayDrafter,
    alpha_for_tau,
    load_trace,
    rounds_trace,
    synthetic_trace,
    trace_for,
)
from test_online import EOS, VOCAB, perturbed, tiny_llama

from specalign.errors import DataError, SpecalignError
from tests.engine_drafters import TargetAsDrafter

GAMMA, MAX_NEW = 4, 24
RESERVE = MAX_NEW + GAMMA + 1
KINDS = ["model", "tokens", "target", "token_adapter", "eagle3", "eagle3_both"]


def token_adapter(seed: int = 0, condition_on_draft: bool = True, copy: bool = True) -> TokenAdapter:
    """A random TokenAdapter with its draft gate and copy pointer open (so that the draft matters)."""
    torch.manual_seed(seed)
    model = TokenAdapter(TokenAdapterConfig(vocab_size=VOCAB, n_layer=2, d_model=32, n_head=2, d_ff=64, max_len=80,
                                            dropout=0.0, condition_on_draft=condition_on_draft, copy=copy)).eval()
    with torch.no_grad():
        if condition_on_draft:
            model.gate.fill_(1.0)
            if copy:
                model.copy_gate.bias.fill_(0.0)
    return model


def eagle3(names: list[str], seed: int = 0) -> Eagle3Drafter:
    """A random EAGLE-3 over the tiny Llama's width, a 48-token draft vocabulary (every second id)."""
    torch.manual_seed(seed)
    cfg = Eagle3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=VOCAB, draft_vocab_size=48, feature_names=names, fc_in_features=32 * len(names))
    model = Eagle3Drafter(cfg).eval()
    with torch.no_grad():
        model.d2t.copy_(torch.arange(48))
    return model


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(0)
    draft = perturbed(target, 1, 0.02)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, VOCAB, (1, n), generator=g) for n in (5, 8, 11, 7)]
    greedy = [greedy_generate(target, {"input_ids": p}, MAX_NEW, EOS).tokens for p in prompts]
    return target, draft, prompts, greedy


def drafter_for(kind: str, target, draft, prompt, fast: bool):
    """(drafter, its request, hidden layers): `fast` gives the static-engine version (static caches,
    static-shape rounds), else the eager drafter on transformers' growing cache."""
    inputs = {"input_ids": prompt}
    draft_model = make_engine(draft, "static", RESERVE) if fast else draft
    if kind == "model":
        return ModelDrafter(draft_model), inputs, ()
    if kind == "tokens":
        return TokenListDrafter(), greedy_generate(draft, inputs, MAX_NEW, EOS).tokens, ()
    if kind == "target":
        return TargetAsDrafter(make_engine(target, "static", RESERVE) if fast else target), None, ()
    if kind == "token_adapter":
        model, response = token_adapter(), greedy_generate(draft, inputs, MAX_NEW, EOS).tokens
        return OnlineDrafter(model, DraftResponse, static=TokenAdapterProposer(model) if fast else None), response, ()
    names = ["target.h0", "target.h1"] + (["draft.h1"] if kind == "eagle3_both" else [])
    model = eagle3(names)
    drafter = OnlineDrafter(model, lambda: FeatureInputs(names, draft_model, torch.float32),
                            static=Eagle3Proposer(model) if fast else None)
    return drafter, inputs, drafter.hidden_layers


# ----------------------------------------------------------------------------- the static engine

def test_static_engine_plain_greedy_is_plain_greedy(pair):
    target, _, prompts, greedy = pair
    engine = make_engine(target, "static", RESERVE)
    assert isinstance(engine, StaticDecoder) and not engine.cuda_graphs
    for prompt, tokens in zip(prompts, greedy):        # one cache for every request: stale keys stay masked
        assert greedy_generate(engine, {"input_ids": prompt}, MAX_NEW, EOS).tokens == tokens


@pytest.mark.parametrize("kind", KINDS)
def test_online_greedy_on_the_static_engine_is_plain_greedy(pair, kind):
    """Every drafter on the static engine: the output is plain greedy decoding, and the rounds are those of
    the eager drafter on transformers' growing cache (so cropping after each rejection is exact)."""
    target, draft, prompts, greedy = pair
    engine = make_engine(target, "static", RESERVE)
    acc = Acceptance(GAMMA)
    for prompt, tokens in zip(prompts, greedy):
        runs = []
        for fast in (True, False):
            drafter, request, layers = drafter_for(kind, target, draft, prompt, fast)
            runs.append(speculative_generate(engine if fast else target, {"input_ids": prompt}, drafter, gamma=GAMMA,
                                             max_new_tokens=MAX_NEW, eos_token_id=EOS, hidden_layers=layers,
                                             request=request))
        assert runs[0].tokens == runs[1].tokens == tokens
        assert runs[0].rounds == runs[1].rounds
        acc.add_sample(runs[0].rounds)
    if kind == "target":
        assert acc.alpha == 1.0 and acc.proposed > 0
    if kind in ("model", "tokens"):
        assert 0 < acc.alpha < 1


def test_fast_proposals_are_the_eager_proposals():
    """The static-shape rounds (padded, masked buffers) propose what `propose` does, across buckets."""
    g = torch.Generator().manual_seed(1)
    for cond, copy in ((True, True), (True, False), (False, False)):
        model = token_adapter(condition_on_draft=cond, copy=copy)
        proposer = TokenAdapterProposer(model)
        for m in (0, 5, 70):
            draft = torch.randint(0, VOCAB, (m,), generator=g).tolist()
            proposer.begin(draft)
            for p, gamma in ((0, 3), (7, 5), (63, 2), (64, 4), (78, 5)):     # 78: capped at max_len, eager path
                prefix = torch.randint(0, VOCAB, (p,), generator=g).tolist()
                assert proposer.propose(draft, prefix, gamma) == model.propose(draft, prefix, gamma)[0], \
                    (cond, copy, m, p)
    model = eagle3(["target.h0", "target.h1", "target.h1"])
    proposer = Eagle3Proposer(model)
    for p, gamma in ((1, 3), (9, 5), (64, 2), (65, 4)):
        feats = torch.randn(p + 2, 96, generator=g)
        tokens = torch.randint(0, VOCAB, (p,), generator=g).tolist()
        assert proposer.propose(feats, tokens, gamma) == model.propose(feats, tokens, gamma)[0], p
    assert proposer.propose(torch.zeros(0, 96), [], 3) == []


def test_static_eagle3_proposer_with_the_prompt_context_proposes_what_propose_does():
    """The prompt row first and the video rows' keys in fixed buffers (set per request by `begin`): the same
    tokens as the eager `propose`, from the first round (p = 0) on, across buckets and requests."""
    g = torch.Generator().manual_seed(3)
    names = ["target.h0", "target.h1", "target.h1"]
    torch.manual_seed(0)
    model = Eagle3Drafter(Eagle3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=VOCAB, draft_vocab_size=48,
                                       feature_names=names, fc_in_features=96, prompt_context=True,
                                       context_features=names, video_rows=3)).eval()
    proposer = Eagle3Proposer(model)
    for request in range(2):
        rows = PromptRows(torch.randn(70, 96, generator=g), torch.randn(96, generator=g), request + 5,
                          torch.randn(3, 96, generator=g))
        proposer.begin(rows._replace(rows=rows.rows[:0]))
        for p, gamma in ((0, 3), (1, 3), (9, 5), (63, 2), (64, 4)):
            tokens = torch.randint(0, VOCAB, (p,), generator=g).tolist()
            expected = model.propose(rows, tokens, gamma)[0]
            assert len(expected) == gamma and proposer.propose(rows, tokens, gamma) == expected, (request, p)


# ----------------------------------------------------------------------------- replayed acceptance

class Counting:
    """A drafter wrapper recording the accepted length at each of its proposals."""

    def __init__(self, drafter):
        self.drafter, self.starts = drafter, []
        self.hidden_layers = getattr(drafter, "hidden_layers", ())

    def begin(self, context):
        self.drafter.begin(context)

    def propose(self, accepted, gamma):
        self.starts.append(len(accepted))
        return self.drafter.propose(accepted, gamma)

    def observe(self, accepted_tokens, hidden):
        self.drafter.observe(accepted_tokens, hidden)


def planned(lengths: list[int], n: int, gamma: int) -> list[int]:
    """The accepted lengths a replay of `lengths` gives over an n-token answer."""
    out, p = [], 0
    for a in itertools.cycle(lengths):
        if p >= n:
            return out
        out.append(min(a, gamma, n - p))
        p += out[-1] + 1


@pytest.mark.parametrize("kind", ["token_adapter", "eagle3"])
def test_replay_drafter_reproduces_a_trace(pair, kind):
    """The real drafter runs every round, the target accepts exactly the traced lengths, the output is
    plain greedy decoding, and every round but the first and the last verifies gamma + 1 tokens."""
    target, draft, prompts, greedy = pair
    engine = make_engine(target, "static", RESERVE)
    trace = [2, 0, 4, 1, 3, 4, 0]
    for prompt, tokens in zip(prompts, greedy):
        inner, request, layers = drafter_for(kind, target, draft, prompt, fast=True)
        counting = Counting(inner)
        replay = ReplayDrafter(counting, tokens, itertools.cycle(trace), VOCAB)
        run = speculative_generate(engine, {"input_ids": prompt}, replay, gamma=GAMMA, max_new_tokens=MAX_NEW,
                                   eos_token_id=EOS, hidden_layers=layers, request=request)
        assert run.tokens == tokens
        assert [r.accepted for r in run.log] == replay.planned == planned(trace, len(tokens), GAMMA)
        assert counting.starts == [r.start for r in run.log], "the real drafter proposed every round"
        assert all(r.verified == GAMMA + 1 for r in run.log[1:-1])


def test_synthetic_trace_has_its_tau():
    trace = synthetic_trace(4.1, [3, 5, 7])
    tau = {g: sum(a + 1 for a in trace[g][0]) / len(trace[g][0]) for g in trace}
    assert abs(tau[5] - 4.1) < 0.01
    assert tau[3] < tau[5] < tau[7] and all(0 <= a <= 3 for a in trace[3][0])
    window = trace[5][0][:50]                                 # a short stretch is close to the mean too
    assert abs(sum(a + 1 for a in window) / 50 - 4.1) < 0.2
    with pytest.raises(SpecalignError, match="--tau must be between 1 and gamma"):
        alpha_for_tau(6.5, 5)


def test_rounds_trace_round_trips_through_a_report(tmp_path):
    """`rounds_trace` (as evaluate writes it) is read back by `load_trace`."""
    target = [1, 2, 3, 4, 5, 6, 7, 8]
    rounds = {g: [simulate_greedy(target, lambda p, gamma: target[p: p + 2] + [0], g)] for g in (3, 5)}
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"rounds_trace": {"drafter": rounds_trace(rounds)}}))
    trace = load_trace(path)
    assert trace == {3: [[2, 2, 2]], 5: [[2, 2, 2]]}
    assert trace_for(trace, 3, str(path)) == [2, 2, 2]


# ----------------------------------------------------------------------------- bad input

def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_trace_without_per_round_lengths_is_refused(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"results": {}}))
    with pytest.raises(DataError) as e:
        load_trace(path)
    assert "rounds_trace" in one_line(e) and "--tau" in one_line(e) and str(path) in one_line(e)
    path.write_text(json.dumps({"rounds_trace": {"drafter": {"5": [[1, 9]]}}}))
    with pytest.raises(DataError, match="not lists of accepted lengths 0..5"):
        load_trace(path)
    path.write_text(json.dumps({"rounds_trace": {"raw_draft": {"5": [[1, 2]]}}}))
    with pytest.raises(DataError, match=r"--trace-drafter with one of \['raw_draft'\]"):
        load_trace(path)
    with pytest.raises(DataError, match=r"no rounds_trace at gamma=3 \(it has \[5\]\)"):
        trace_for(load_trace(path, "raw_draft"), 3, str(path))


def test_request_longer_than_the_static_cache_is_refused(pair):
    target, _, prompts, _ = pair
    engine = StaticDecoder(target, reserve=RESERVE, max_len=20)
    with pytest.raises(SpecalignError) as e:
        greedy_generate(engine, {"input_ids": prompts[0]}, MAX_NEW, EOS)           # 5 + 29 > 20
    assert "engine.max_len=20" in one_line(e) and "raise engine.max_len" in one_line(e)
    engine = StaticDecoder(target, reserve=3)                                       # too little room for 24 tokens
    with pytest.raises(SpecalignError, match="past the static KV cache"):
        greedy_generate(engine, {"input_ids": torch.randint(2, VOCAB, (1, 125))}, MAX_NEW)


def test_cuda_graphs_on_a_cpu_are_refused(pair):
    target = pair[0]
    with pytest.raises(SpecalignError) as e:
        make_engine(target, "static", cuda_graphs=True)
    assert "engine.cuda_graphs=false" in one_line(e)
    with pytest.raises(SpecalignError, match="engine.compile=false"):
        make_engine(target, "static", compile=True)
    with pytest.raises(SpecalignError, match="need engine.kind=static"):
        make_engine(target, "dynamic", cuda_graphs=True)
    with pytest.raises(SpecalignError, match="cuda_graphs=false"):
        TokenAdapterProposer(token_adapter(), cuda_graphs=True)
    with pytest.raises(SpecalignError, match="engine.kind must be one of"):
        make_engine(target, "paged")
