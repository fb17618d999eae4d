"""Draft trees (specdec/tree.py) on tiny models built in code: the tree verification (4D mask, positions) and
the cache compaction against full recomputes on both engines (transformers' growing cache and the static one),
tree decoding = plain greedy = the offline walk round by round, the static engine's rounds = the growing cache's,
the drafters' batched hook against their own chains, and the tree configurations that cannot work."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest_train import LAYERS, H, V
from specalign.adapters.eagle3 import Eagle3Config, Eagle3Drafter, PromptRows, build_vocab_maps
from specalign.adapters.token_adapter import TokenAdapter, TokenAdapterConfig
from specalign.specdec.engine import StaticDecoder
from specalign.specdec.metrics import Acceptance, simulate_rounds
from specalign.specdec.online import (
    ModelDrafter,
    compact,
    forward_tokens,
    forward_tree,
    greedy_generate,
    run_prefill,
    speculative_generate,
    tree_generate,
)
from specalign.specdec.replay import ReplayTreeDrafter
from specalign.specdec.tree import TreeSpec, check_tree_drafter, grow, round_counts, tree_notes, tree_spec
from test_online import EOS, MAX_NEW, VOCAB, perturbed, tiny_llama

from specalign.errors import SpecalignError

GAMMA, SPEC = 4, TreeSpec(budget=12, topk=3)


class DraftLMTree:
    """A draft LM growing trees from full forwards over prompt + prefix + path (no cache), so the offline walk
    and the online engine call the very same hook."""

    def __init__(self, model, prompt: list[int]):
        self.model, self.prompt = model, prompt

    @torch.no_grad()
    def tree_logprobs(self, context, prefix, paths):
        ids = torch.tensor([self.prompt + list(prefix) + p for p in paths])
        return self.model(input_ids=ids).logits[:, -1].float().log_softmax(-1)

    def grow(self, prefix, depth, spec):
        return grow(lambda paths: self.tree_logprobs(None, prefix, paths), depth, spec.budget, spec.topk)

    # the online engine's drafter protocol (specdec/online.py: tree_generate)
    def begin(self, context):
        pass

    def propose_tree(self, accepted, depth, spec):
        return self.grow(accepted, depth, spec)

    def observe(self, accepted_tokens, hidden):
        pass


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(0)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 8, 11)]
    return target, perturbed(target, 1, 0.05), prompts


def test_grow_keeps_the_best_nodes_as_a_tree():
    """Budget, top-k, depth; every kept node's parent is kept and scores no lower; top-1 is the greedy chain."""
    table = torch.randn(50, 30, generator=torch.Generator().manual_seed(0)).log_softmax(-1)

    def hook(paths):
        return table[[sum(p) % 50 for p in paths]]

    tree = grow(hook, 5, 9, 3)
    assert len(tree) == 9 and tree.depth <= 5
    for i, parent in enumerate(tree.parents):
        assert parent < i and (parent < 0 or tree.scores[parent] >= tree.scores[i])
        assert tree.depths[i] == (1 if parent < 0 else tree.depths[parent] + 1)
    assert len({(p, t) for p, t in zip(tree.parents, tree.tokens)}) == len(tree), "siblings hold distinct tokens"
    chain = grow(hook, 5, 5, 1)
    assert chain.parents == [-1, 0, 1, 2, 3]
    prefix: list[int] = []
    for tok in chain.tokens:
        assert tok == int(hook([prefix]).argmax())
        prefix.append(tok)
    # a path is accepted while the target's tokens follow it
    r = chain.tokens[:3] + [(chain.tokens[3] + 1) % 30]
    assert round_counts(chain, r, 0) == (4, 3) and round_counts(chain, chain.tokens[:2], 0) == (2, 2)


def test_tree_verification_and_compaction_equal_a_full_recompute(pair):
    """Each node's target logits are those of a plain forward over prompt + pending + its path; after compaction
    to the deepest path the cache and the next step are those of decoding that path."""
    target, draft, prompts = pair
    prompt, pending = prompts[1], [7]
    pre = run_prefill(target, {"input_ids": torch.tensor([prompt])})
    tree = DraftLMTree(draft, prompt).grow(pending, GAMMA, SPEC)
    assert len(tree) == SPEC.budget and tree.depth == GAMMA and len(set(tree.parents)) > GAMMA, "a branching tree"
    logits, _ = forward_tree(target, pre.cache, pending, tree)                            # [1 + N, V]
    with torch.no_grad():
        for i in range(len(tree)):
            full = target(input_ids=torch.tensor([prompt + pending + tree.path_tokens(i)])).logits[0, -1]
            torch.testing.assert_close(logits[1 + i], full, atol=1e-4, rtol=1e-4)
    deepest = max(range(len(tree)), key=lambda i: (tree.depths[i], -i))
    path = tree.path(deepest)
    compact(pre.cache, list(range(len(prompt) + 1)) + [len(prompt) + 1 + i for i in path])
    step, _ = forward_tokens(target, pre.cache, [5])
    ids = torch.tensor([prompt + pending + tree.path_tokens(deepest) + [5]])
    with torch.no_grad():
        fresh = run_prefill(target, {"input_ids": ids})
    torch.testing.assert_close(step[-1], fresh.logits, atol=1e-4, rtol=1e-4)
    for mine, ref in zip(pre.cache.layers, fresh.cache.layers):
        torch.testing.assert_close(mine.keys, ref.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mine.values, ref.values, atol=1e-4, rtol=1e-4)


def test_tree_decoding_equals_plain_greedy_and_the_offline_walk(pair):
    """Token for token plain greedy output, round for round the offline walk over it; the tree accepts more
    per round than the same draft model's chain."""
    target, draft, prompts = pair
    tree_acc, chain_acc = Acceptance(GAMMA), Acceptance(GAMMA)
    for prompt in prompts:
        spec = {"input_ids": torch.tensor([prompt])}
        plain = greedy_generate(target, spec, MAX_NEW, EOS).tokens
        drafter = DraftLMTree(draft, prompt)
        run = tree_generate(target, spec, drafter, gamma=GAMMA, tree=SPEC, max_new_tokens=MAX_NEW, eos_token_id=EOS)
        assert run.tokens == plain
        offline = simulate_rounds(len(plain), lambda p, d=drafter, r=plain: round_counts(d.grow(r[:p], GAMMA, SPEC), r, p))
        assert run.rounds == offline
        assert all(r.verified == (1 if i else 0) + len(r.proposal) for i, r in enumerate(run.log))
        tree_acc.add_sample(run.rounds)
        chain = speculative_generate(target, spec, ModelDrafter(draft), gamma=GAMMA, max_new_tokens=MAX_NEW,
                                     eos_token_id=EOS, request=spec)
        assert chain.tokens == plain
        chain_acc.add_sample(chain.rounds)
    assert tree_acc.tau > chain_acc.tau, (tree_acc.tau, chain_acc.tau)


def test_drafter_hooks_grow_their_own_greedy_chains():
    """A top-1 tree with budget = depth is the drafter's `propose` chain, and the hook's rows are the
    distributions `propose` picks from."""
    torch.manual_seed(0)
    ta = TokenAdapter(TokenAdapterConfig(vocab_size=V, n_layer=2, d_model=32, n_head=2, d_ff=64, max_len=12,
                                         dropout=0.0)).eval()
    c = Eagle3Config(hidden_size=H, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=V, draft_vocab_size=16, fc_in_features=3 * H, aux_layer_ids=LAYERS, ttt_steps=3)
    e3 = Eagle3Drafter(c).eval()
    d2t, t2d = build_vocab_maps(torch.arange(V).flip(0), 16)
    e3.d2t.copy_(d2t)
    e3.t2d.copy_(t2d)
    ctx = Eagle3Drafter(Eagle3Config(**{**c.to_dict(), "prompt_context": True, "video_rows": 2,
                                        "context_features": list(c.feature_names)})).eval()
    ctx.d2t.copy_(d2t)
    ctx.t2d.copy_(t2d)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, V, (6,), generator=g).tolist()
    rows = PromptRows(torch.randn(8, 3 * H, generator=g), torch.randn(3 * H, generator=g), 7,
                      torch.randn(2, 3 * H, generator=g))
    cases = [(ta, [5, 9, 4], prefix), (ta, [], prefix[:2]), (e3, torch.randn(8, 3 * H, generator=g), prefix),
             (ctx, rows, prefix), (ctx, rows, [])]                # with the prompt context, from p = 0 too
    for model, context, pre in cases:
        seen = []

        def pick(logits, seen=seen):
            seen.append(logits.float().log_softmax(-1))
            return int(logits.argmax()), None

        chain, _ = model.propose(context, pre, GAMMA, pick)
        tree = grow(lambda paths, m=model, c=context, p=pre: m.tree_logprobs(c, p, paths), GAMMA, GAMMA, 1)
        assert tree.tokens == chain and tree.parents == [-1, 0, 1, 2]
        for k in range(GAMMA):
            row = model.tree_logprobs(context, pre, [chain[:k]])[0]
            finite = torch.isfinite(seen[k])
            assert torch.equal(finite, torch.isfinite(row))
            torch.testing.assert_close(row[finite], seen[k][finite], atol=1e-4, rtol=1e-4)
    # one token short of max_len the TokenAdapter proposes one depth; EAGLE-3 nothing at p = 0
    assert len(grow(lambda paths: ta.tree_logprobs([], list(range(3, 14)), paths), GAMMA, 8, 2)) == 2
    assert len(grow(lambda paths: e3.tree_logprobs(torch.randn(4, 3 * H), [], paths), GAMMA, 8, 2)) == 0


@pytest.mark.parametrize("cfg, gammas, key", [
    ({"budget": 3, "topk": 2}, [1, 5], "tree.budget=3 is below the depth gamma=5"),
    ({"budget": 8, "topk": 0}, [5], "tree.topk=0"),
    ({"budget": -1, "topk": 2}, [5], "tree.budget must be 0"),
])
def test_tree_configurations_that_cannot_work_are_one_line(cfg, gammas, key):
    with pytest.raises(SpecalignError, match=key) as e:
        tree_spec(cfg, gammas)
    assert "\n" not in str(e.value)


def test_chains_and_tree_needs():
    assert not tree_spec({"budget": 0, "topk": 0}, [5]).on and not tree_spec(None, [5]).on
    assert tree_notes(TreeSpec()) == [] and "chain-only" in tree_notes(TreeSpec(8, 2), 1.0)[-1]
    with pytest.raises(SpecalignError, match="'raw_draft' has no next-token distribution"):
        check_tree_drafter(None, "raw_draft", TreeSpec(8, 2))
    check_tree_drafter(None, "raw_draft", TreeSpec())                  # chains: nothing to check



def static_engine(target) -> StaticDecoder:
    """The fast engine on the CPU (graphs off: the same functions a CUDA graph replays), room for a tree."""
    return StaticDecoder(target, reserve=MAX_NEW + SPEC.budget + 1, max_width=SPEC.budget + 1)


def test_static_tree_verification_and_compaction_equal_a_full_recompute(pair):
    """The static engine's tree forward (slots after the cache, tree positions, the mask built from the cache's
    length over stale slots of an earlier, longer forward) gives each node the logits of a plain forward over
    prompt + pending + its path; compacted to a branch's path, the next step is that of decoding the path."""
    target, draft, prompts = pair
    prompt, pending = prompts[1], [7]
    engine = static_engine(target)
    pre = run_prefill(engine, {"input_ids": torch.tensor([prompt])})
    forward_tokens(engine, pre.cache, list(range(3, 3 + SPEC.budget)))   # stale keys past the length
    compact(engine, range(len(prompt)))
    tree = DraftLMTree(draft, prompt).grow(pending, GAMMA, SPEC)
    logits, _ = forward_tree(engine, engine, pending, tree)                                 # [1 + N, V]
    assert engine.length == len(prompt) + 1 + len(tree)
    with torch.no_grad():
        for i in range(len(tree)):
            full = target(input_ids=torch.tensor([prompt + pending + tree.path_tokens(i)])).logits[0, -1]
            torch.testing.assert_close(logits[1 + i], full, atol=1e-4, rtol=1e-4)
    # a path that skips nodes (not the first branch): its slots move down, the rest is cropped
    last = max(range(len(tree)), key=lambda i: (tree.depths[i], i))
    path = tree.path(last)
    assert path != list(range(len(path))), "the path must move slots"
    compact(engine, list(range(len(prompt) + 1)) + [len(prompt) + 1 + i for i in path])
    assert engine.length == len(prompt) + 1 + len(path)
    step, _ = forward_tokens(engine, engine, [5])
    with torch.no_grad():
        full = target(input_ids=torch.tensor([prompt + pending + tree.path_tokens(last) + [5]])).logits[0, -1]
    torch.testing.assert_close(step[-1], full, atol=1e-4, rtol=1e-4)
    small = StaticDecoder(target, reserve=2, max_len=len(prompt) + 4)          # no room for the tree
    run_prefill(small, {"input_ids": torch.tensor([prompt])})
    with pytest.raises(SpecalignError, match="past the static KV cache") as e:
        forward_tree(small, small, pending, tree)
    assert "\n" not in str(e.value) and small.length == len(prompt)


def test_static_tree_decoding_equals_plain_greedy_and_the_growing_cache(pair):
    """tree_generate on the static engine: plain greedy output, and round for round the trees, accepted lengths
    and verification widths of the growing cache's run."""
    target, draft, prompts = pair
    engine = static_engine(target)
    for prompt in prompts:
        spec = {"input_ids": torch.tensor([prompt])}
        plain = greedy_generate(target, spec, MAX_NEW, EOS).tokens
        kw = {"gamma": GAMMA, "tree": SPEC, "max_new_tokens": MAX_NEW, "eos_token_id": EOS}
        fast = tree_generate(engine, spec, DraftLMTree(draft, prompt), **kw)
        slow = tree_generate(target, spec, DraftLMTree(draft, prompt), **kw)
        assert fast.tokens == plain == slow.tokens
        assert [(r.start, r.proposal, r.accepted, r.verified) for r in fast.log] == \
            [(r.start, r.proposal, r.accepted, r.verified) for r in slow.log]
        assert fast.rounds == slow.rounds and any(r.accepted < len(r.proposal) for r in fast.log)


def test_replayed_trees_accept_exactly_the_trace(pair):
    """bench/specdec.py's tree rows: the drafter's own tree grows every round, the verified tree of its node count
    holds the target's tokens on one root path for the traced length; the static engine accepts exactly that and
    the output stays plain greedy (EOS off: the trace runs to the length limit)."""
    target, draft, prompts = pair
    trace = [0, 3, 1, 4, 2, 4, 0]
    prompt = prompts[0]
    spec_in = {"input_ids": torch.tensor([prompt])}
    plain = greedy_generate(target, spec_in, MAX_NEW).tokens
    replay = ReplayTreeDrafter(DraftLMTree(draft, prompt), plain, itertools.cycle(trace), VOCAB)
    run = tree_generate(static_engine(target), spec_in, replay, gamma=GAMMA, tree=SPEC, max_new_tokens=MAX_NEW)
    assert run.tokens == plain
    assert [r.accepted for r in run.log] == replay.planned
    assert replay.planned[:5] == trace[:5] and all(len(r.proposal) == SPEC.budget for r in run.log)
    assert replay.grown[0] == SPEC.budget
