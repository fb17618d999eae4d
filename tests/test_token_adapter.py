"""TokenAdapter: size, position convention, gated conditioning, the ablation, overfitting."""

import torch
import torch.nn.functional as F
from conftest_train import V, noisy_copy, sequences
from specalign.adapters.token_adapter import TokenAdapter, TokenAdapterConfig
from specalign.specdec.metrics import simulate_greedy
from specalign.train.datamodule import collate_tokens

TINY = {"vocab_size": V, "n_layer": 2, "d_model": 32, "n_head": 2, "d_ff": 64, "max_len": 32, "dropout": 0.0}


def tiny(**kw) -> TokenAdapter:
    torch.manual_seed(0)
    return TokenAdapter(TokenAdapterConfig(**{**TINY, **kw})).eval()


def batch(n=6, seed=0):
    seqs = sequences(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    items = [{"draft": torch.tensor(noisy_copy(s, g)), "target": torch.tensor(s)} for s in seqs]
    return collate_tokens(items)


def test_about_50m_parameters_at_the_32k_vocabulary():
    n = TokenAdapter(TokenAdapterConfig(vocab_size=32000)).num_params()
    print(f"TokenAdapter parameters at V=32000: {n / 1e6:.2f}M")
    assert 40e6 < n < 55e6


def greedy_by_logits(m, draft, prefix, gamma):
    """Reference drafting without the KV cache: full teacher-forced passes."""
    d = torch.tensor([draft])
    out = []
    for _ in range(gamma):
        seq = torch.tensor([prefix + out + [0]])        # the last slot is a dummy label
        out.append(int(m.logits(d, torch.tensor([len(draft)]), seq)[0, -1].argmax()))
    return out


def test_propose_reads_the_position_that_predicts_r_p():
    m = tiny()
    b = batch(1)
    draft, target = b["draft"][0].tolist(), b["target"][0].tolist()
    lp = m.logits(b["draft"], b["draft_len"], b["target"])[0]           # position j predicts r_j
    for p in range(len(target)):
        assert m.propose(draft, target[:p], 1)[0] == [int(lp[p].argmax())]
        assert m.propose(draft, target[:p], 4)[0] == greedy_by_logits(m, draft, target[:p], 4)


def test_ablation_ignores_draft_tokens_entirely():
    m = tiny(condition_on_draft=False)
    b = batch(4)
    other = torch.randint(3, V, b["draft"].shape)
    a = m.logits(b["draft"], b["draft_len"], b["target"])
    assert torch.equal(a, m.logits(other, b["draft_len"] * 0 + 2, b["target"]))
    prefix = b["target"][0, :3].tolist()
    assert m.propose([5, 6, 7], prefix, 4) == m.propose([], prefix, 4)


def test_closed_gate_or_dropped_draft_is_exactly_the_prefix_only_model():
    cond, ablation = tiny(copy=False), tiny(condition_on_draft=False)
    ablation.load_state_dict({k: v for k, v in cond.state_dict().items() if k != "gate"})
    b = batch(4)
    ref = ablation.logits(b["draft"], b["draft_len"], b["target"])
    torch.testing.assert_close(cond.logits(b["draft"], b["draft_len"], b["target"]), ref)
    with torch.no_grad():
        cond.gate.fill_(1.0)                                                   # opened gate ...
    assert not torch.allclose(cond.logits(b["draft"], b["draft_len"], b["target"]), ref)
    dropped = torch.zeros(4, dtype=torch.bool)                                 # ... but draft dropped
    torch.testing.assert_close(cond.logits(b["draft"], b["draft_len"], b["target"], keep=dropped), ref)


def overfit(m, b, steps=300):
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    mask = torch.arange(b["target"].shape[1]) < b["target_len"][:, None]
    for _ in range(steps):
        lp = m.logits(b["draft"], b["draft_len"], b["target"])
        if (lp.argmax(-1) == b["target"])[mask].all():
            break
        loss = F.nll_loss(lp[mask], b["target"][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_conditioned_adapter_overfits_to_100_percent_through_the_draft():
    """All targets start with the same token and then differ: only the draft can tell which."""
    b = batch(6)
    m = overfit(tiny(draft_dropout=0.0), b)
    for i in range(6):
        n = int(b["target_len"][i])
        draft, target = b["draft"][i, : b["draft_len"][i]].tolist(), b["target"][i, :n].tolist()
        rounds = simulate_greedy(target, lambda p, g, d=draft, t=target: m.propose(d, t[:p], g)[0], 4)
        assert sum(r.accepted for r in rounds) == sum(r.proposed for r in rounds)   # every draft accepted
    assert torch.tanh(m.gate).abs().max() > 0                                       # the gate opened


def test_prefix_only_model_overfits_a_deterministic_chain():
    chain = [3, 9, 4, 17, 11, 5, 20, 8, 14, 6]
    b = collate_tokens([{"draft": torch.tensor([2]), "target": torch.tensor(chain[:n])} for n in (4, 7, 10)])
    m = overfit(tiny(condition_on_draft=False), b)
    assert m.propose([], [], 10)[0] == chain
