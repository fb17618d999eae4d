"""Online speculative decoding on tiny Llama models built in code (no hub, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from assisted import assisted_generate
from specalign.specdec import online
from specalign.specdec.metrics import Acceptance, raw_draft_proposer, simulate_greedy
from specalign.specdec.online import (
    ModelDrafter,
    Sampling,
    TokenListDrafter,
    greedy_generate,
    run_prefill,
    speculative_generate,
)
from transformers import LlamaConfig, LlamaForCausalLM

from tests.engine_drafters import TargetAsDrafter

VOCAB, GAMMA, MAX_NEW, EOS = 96, 4, 24, 1


def tiny_llama(seed: int, vocab: int = VOCAB, init: float = 0.5) -> LlamaForCausalLM:
    """A random 2-layer Llama; a large init range gives peaked, non-uniform next-token distributions."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=init, bos_token_id=0, eos_token_id=EOS, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def perturbed(model: LlamaForCausalLM, seed: int, scale: float) -> LlamaForCausalLM:
    """A different draft model that agrees with `model` often, not always."""
    draft, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(torch.randn(w.shape, generator=g) * scale * w.std())
    return draft


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(0)
    draft = perturbed(target, 1, 0.02)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, VOCAB, (1, n), generator=g) for n in (5, 8, 11, 7)]       # [1, P]
    greedy = [greedy_generate(target, {"input_ids": p}, MAX_NEW, EOS).tokens for p in prompts]
    lengths = {len(t) for t in greedy}
    assert MAX_NEW in lengths and min(lengths) < MAX_NEW, "the prompts should cover both EOS and length stops"
    return target, draft, prompts, greedy


def drafter_and_request(kind: str, target, draft, prompt):
    """(drafter, its per-sequence request) for a drafter kind."""
    inputs = {"input_ids": prompt}
    if kind == "model":
        return ModelDrafter(draft), inputs
    if kind == "tokens":   # the raw-draft baseline: the draft model's own free-running response
        return TokenListDrafter(), greedy_generate(draft, inputs, MAX_NEW, EOS).tokens
    return TargetAsDrafter(target), None


def run_online(kind: str, target, draft, prompt, **kwargs) -> online.OnlineResult:
    drafter, request = drafter_and_request(kind, target, draft, prompt)
    return speculative_generate(target, {"input_ids": prompt}, drafter, gamma=GAMMA, max_new_tokens=MAX_NEW,
                                eos_token_id=EOS, request=request, **kwargs)


@torch.no_grad()
def draft_greedy_proposer(draft, prompt, response):
    """The offline proposer of a draft model: greedy from prompt + response[:p], full forwards, no cache."""
    def propose(p: int, gamma: int) -> list[int]:
        ids = prompt[0].tolist() + list(response[:p])
        for _ in range(gamma):
            ids.append(int(draft(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(ids) - gamma:]
    return propose


# ----------------------------------------------------------------------------- greedy

def test_greedy_generate_matches_transformers(pair):
    target, _, prompts, greedy = pair
    for prompt, tokens in zip(prompts, greedy):
        ref = target.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=0)
        assert ref[0, prompt.shape[1]:].tolist() == tokens


@pytest.mark.parametrize("kind", ["model", "tokens", "target"])
def test_online_greedy_is_target_greedy(pair, kind):
    target, draft, prompts, greedy = pair
    for prompt, tokens in zip(prompts, greedy):
        result = run_online(kind, target, draft, prompt)
        assert result.tokens == tokens
        assert sum(r.generated for r in result.rounds) == len(tokens)
        assert result.prefill_s > 0 and all(r.verify_s > 0 and r.draft_s > 0 for r in result.log)


@pytest.mark.parametrize("kind", ["model", "tokens"])
def test_online_acceptance_equals_offline_simulation(pair, kind):
    target, draft, prompts, greedy = pair
    on, off = Acceptance(GAMMA), Acceptance(GAMMA)
    for prompt, tokens in zip(prompts, greedy):
        drafter, request = drafter_and_request(kind, target, draft, prompt)
        result = speculative_generate(target, {"input_ids": prompt}, drafter, gamma=GAMMA,
                                      max_new_tokens=MAX_NEW, eos_token_id=EOS, request=request)
        propose = raw_draft_proposer(request) if kind == "tokens" else draft_greedy_proposer(draft, prompt, tokens)
        offline = simulate_greedy(tokens, propose, GAMMA)
        assert result.rounds == offline
        assert [r.accepted for r in result.log[:-1]] == [r.accepted for r in offline[:-1]]
        on.add_sample(result.rounds)
        off.add_sample(offline)
    assert on.summary() == off.summary()
    assert 0 < on.alpha < 1, "the pair should give both acceptances and rejections"


def test_target_as_drafter_gives_alpha_one(pair):
    target, draft, prompts, _ = pair
    acc = Acceptance(GAMMA)
    for prompt in prompts:
        acc.add_sample(run_online("target", target, draft, prompt).rounds)
    assert acc.alpha == 1.0 and acc.proposed > 0
    assert all(a == 1.0 for a in acc.alpha_at if a is not None)


class Recorder(ModelDrafter):
    """A ModelDrafter that keeps the target hidden states it is handed."""

    def begin(self, context):
        super().begin(context)
        self.features = {i: [h] for i, h in context.hidden.items()}

    def observe(self, accepted_tokens, hidden):
        for i, h in hidden.items():
            self.features[i].append(h)


@torch.no_grad()
def test_hidden_states_reach_the_drafter(pair):
    """Prompt features from begin + per-round features from observe = the target's features of the
    whole sequence but the last token."""
    target, draft, prompts, _ = pair
    layers = (0, 2)
    for prompt in prompts:
        drafter = Recorder(draft)
        result = speculative_generate(target, {"input_ids": prompt}, drafter, gamma=GAMMA, max_new_tokens=MAX_NEW,
                                      eos_token_id=EOS, hidden_layers=layers, request={"input_ids": prompt})
        sequence = torch.cat([prompt, torch.tensor([result.tokens])], dim=1)                  # [1, P + n]
        full = target(input_ids=sequence, output_hidden_states=True).hidden_states
        n = sequence.shape[1] - 1
        for i in layers:
            got = torch.cat(drafter.features[i])                                               # [>= n, H]
            assert got.shape[0] >= n
            torch.testing.assert_close(got[:n], full[i][0, :n], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- sampling

SAMPLING = Sampling(temperature=0.8, top_p=0.95)
SMALL_VOCAB = 8


@pytest.fixture(scope="module")
def small_pair():
    """Tiny V=8 target and an independent draft, their prompt prefills, and the target's exact
    distribution of the first two response tokens (full forwards, no cache): [V * V]."""
    target, draft = tiny_llama(10, SMALL_VOCAB, 0.15), tiny_llama(11, SMALL_VOCAB, 0.15)
    prompt = torch.tensor([[3, 5, 2, 7]])
    with torch.no_grad():
        p0 = SAMPLING.probs(target(input_ids=prompt).logits[0, -1])                            # [V]
        nexts = torch.cat([prompt.repeat(SMALL_VOCAB, 1), torch.arange(SMALL_VOCAB)[:, None]], dim=1)
        p1 = SAMPLING.probs(target(input_ids=nexts).logits[:, -1])                             # [V, V]
    return target, draft, prompt, (p0[:, None] * p1).flatten()


def cached_prefill(model, prompt):
    """A prefill callable that hands out copies of one prompt cache (saves a forward per run)."""
    pre = run_prefill(model, {"input_ids": prompt})
    return lambda: (pre.logits, copy.deepcopy(pre.cache), pre.length)


def first_two_counts(target, draft, prompt, kind: str, gamma: int, runs: int, seed: int) -> torch.Tensor:
    """Counts over [V * V] of the first two tokens of `runs` speculative-sampling generations, drafted
    by the sampled draft model ("model": q its distributions) or by a fixed token list ("tokens": q one-hot)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "model":
        drafter, request = ModelDrafter(draft, Sampling(temperature=1.0), g), cached_prefill(draft, prompt)
    else:
        drafter, request = TokenListDrafter(), [5, 6]
    target_prefill = cached_prefill(target, prompt)
    counts = torch.zeros(SMALL_VOCAB * SMALL_VOCAB)
    for _ in range(runs):
        out = speculative_generate(target, target_prefill, drafter, gamma=gamma, max_new_tokens=2,
                                   sampling=SAMPLING, generator=g, request=request).tokens
        counts[out[0] * SMALL_VOCAB + out[1]] += 1
    return counts


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, float]:
    """Pearson's statistic (cells expecting < min_expected pooled into one) and its critical value at
    significance 1e-3 (Wilson-Hilferty approximation of the chi-square quantile)."""
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    statistic = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df, z = int(keep.sum()) - 1, 3.090
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return statistic, critical


@pytest.mark.parametrize("kind,gamma", [("model", 1), ("model", 2), ("tokens", 2)])
def test_speculative_sampling_keeps_the_target_distribution(small_pair, kind, gamma):
    """gamma=1 covers rejection then a new round, and the bonus draw; gamma=2 a rejection inside a round."""
    target, draft, prompt, exact = small_pair
    counts = first_two_counts(target, draft, prompt, kind, gamma, runs=2000, seed=gamma)
    statistic, critical = chi_square(counts, exact)
    assert statistic < critical
    assert counts[exact == 0].sum() == 0


def test_wrong_residual_is_detected(small_pair, monkeypatch):
    """The same statistic rejects a broken rule: the replacement drawn from p instead of max(0, p - q)."""
    target, draft, prompt, exact = small_pair
    monkeypatch.setattr(online, "residual", lambda p, q: p)
    statistic, critical = chi_square(first_two_counts(target, draft, prompt, "model", 2, runs=1000, seed=3), exact)
    assert statistic > 3 * critical


# ----------------------------------------------------------------------------- transformers cross-check

@pytest.mark.parametrize("kind", ["model", "tokens", "target"])
def test_assisted_generation_accepts_match_the_engine(pair, kind):
    """transformers' num_matches per round = Round.generated - 1 (= accepted but in a cut last round)."""
    target, draft, prompts, _ = pair
    for prompt in prompts:
        result = run_online(kind, target, draft, prompt)
        drafter, request = drafter_and_request(kind, target, draft, prompt)
        inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
        hf = assisted_generate(target, drafter, inputs, GAMMA, MAX_NEW, EOS, request)
        assert hf.tokens == result.tokens
        assert hf.accepts == [r.generated - 1 for r in result.rounds]
        assert hf.accepts[:-1] == [r.accepted for r in result.rounds[:-1]]
