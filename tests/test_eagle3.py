"""EAGLE-3 drafter: vocabulary maps, the TTT attention mask, in-round unrolling, the alignment
of features with labels (oracle features), overfitting, padding."""

import pytest
import torch
from conftest_train import LAYERS, H, V, make_store
from specalign.adapters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Module, Eagle3Type, build_vocab_maps
from specalign.data.store import FeatureStore
from specalign.train.datamodule import FeatureRows, collate_features

NAMES = [f"target.h{i}" for i in LAYERS]
OPTIM = {"_target_": "torch.optim.AdamW", "lr": 1e-2, "weight_decay": 0.0}
SCHED = {"_target_": "specalign.train.modules.warmup_schedule", "kind": "constant"}


def tiny_config(**kw) -> Eagle3Config:
    base = {"hidden_size": H, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": V, "draft_vocab_size": V, "feature_names": NAMES, "fc_in_features": 3 * H,
            "aux_layer_ids": LAYERS, "ttt_steps": 4}
    return Eagle3Config(**{**base, **kw})


def random_drafter(seed=0) -> Eagle3Drafter:
    torch.manual_seed(seed)
    m = Eagle3Drafter(tiny_config(draft_vocab_size=16)).eval()
    d2t, t2d = build_vocab_maps(torch.arange(V).flip(0), 16)
    m.d2t.copy_(d2t)
    m.t2d.copy_(t2d)
    return m


def test_vocab_maps_keep_the_most_frequent_ids_in_order():
    counts = torch.tensor([0, 5, 1, 9, 9, 0, 3])
    d2t, t2d = build_vocab_maps(counts, 4)
    assert (torch.arange(4) + d2t).tolist() == [1, 3, 4, 6]          # target id = draft id + d2t
    assert t2d.tolist() == [False, True, False, True, True, False, True]


def test_ttt_step_k_sees_real_features_only_up_to_its_chain_start():
    """Chain i at step k may read feature rows <= i and tokens r_0..r_{i+k}; nothing else."""
    m = random_drafter()
    T, steps = 9, 4
    g = torch.Generator().manual_seed(0)
    feats, tokens = torch.randn(1, T, 3 * H, generator=g), torch.randint(0, V, (1, T), generator=g)
    base = m.ttt(feats, tokens, steps)
    for j in range(T):
        f2 = feats.clone()
        f2[0, j] += 1.0
        t2 = tokens.clone()
        t2[0, j] = (t2[0, j] + 1) % V
        by_feat, by_tok = m.ttt(f2, tokens, steps), m.ttt(feats, t2, steps)
        for k in range(steps):
            for i in range(T - k):
                same_f = torch.equal(by_feat[k][0, i], base[k][0, i])
                same_t = torch.equal(by_tok[k][0, i], base[k][0, i])
                assert same_f == (j > i), (j, k, i)                      # feature row j: seen iff j <= i
                assert same_t == (j > i + k), (j, k, i)                  # token r_j: seen iff j <= i + k


def test_propose_unrolls_exactly_like_ttt_on_its_own_tokens():
    m = random_drafter(1)
    g = torch.Generator().manual_seed(1)
    feats, tokens = torch.randn(10, 3 * H, generator=g), torch.randint(0, V, (10,), generator=g).tolist()
    assert m.propose(feats, [], 3) == ([], None)
    lp = m.next_logprobs({"feats": feats[None], "tokens": torch.tensor([tokens])})[0]   # row j predicts r_j
    assert lp.shape == (10, V) and torch.isinf(lp[0]).all()
    torch.testing.assert_close(lp[1:].exp().sum(-1), torch.ones(9))
    for p in range(1, 8):
        assert m.propose(feats, tokens[:p], 1)[0] == [int(lp[p].argmax())]
        prop = m.propose(feats, tokens[:p], 4)[0]
        assert m.propose(feats[:p], tokens[:p], 4)[0] == prop             # rows >= p are never read
        seq = torch.tensor([tokens[:p] + prop])
        logits = m.ttt(torch.cat([feats[:p], torch.randn(4, 3 * H)])[None], seq, 4)
        assert [int(m.to_target(logits[k][0, p - 1].argmax())) for k in range(4)] == prop


def feature_batch(store_dir, split):
    store = FeatureStore(store_dir)
    rows = FeatureRows(str(store_dir), store.select(split), NAMES, 64)
    return collate_features([rows[i] for i in range(len(rows))])


def module(store_dir, **kw) -> Eagle3Module:
    torch.manual_seed(0)
    mod = Eagle3Module(model=tiny_config(**kw).to_dict(), optimizer=OPTIM, scheduler=SCHED)
    mod.init_from_store(FeatureStore(store_dir), "train")
    return mod


def test_oracle_features_reproduce_the_target_tokens(tmp_path):
    """The high layer of row i holds target.final of row i+1. A drafter that passes that slice
    straight to the (target) head must then predict r_{i+1} at chain i: it does only if feature
    rows, tokens, labels and the teacher line up as the store contract says."""
    store = make_store(tmp_path / "oracle", oracle=True)
    mod = module(store)
    m = mod.model
    with torch.no_grad():
        m.fc.weight.zero_()
        m.fc.weight[:, 2 * H:] = torch.eye(H)                            # pick the high layer
        m.layers[0].self_attn.o_proj.weight.zero_()
        m.layers[0].mlp.down_proj.weight.zero_()
    b = feature_batch(store, "train")
    valid = torch.arange(b["tokens"].shape[1]) < b["length"][:, None]
    teacher = m.to_target((b["final"].float() @ mod.teacher_head.T).argmax(-1))
    assert torch.equal(teacher[valid], b["tokens"][valid])               # teacher row j is r_j
    metrics = mod.losses(b, train=False)
    assert metrics["top1"] == 1.0 and metrics["acc_0"] == 1.0
    for i in range(len(b["length"])):
        n = int(b["length"][i])
        target = b["tokens"][i, :n].tolist()
        for p in range(1, n):
            assert m.propose(b["feats"][i, :n], target[:p], 1)[0] == [target[p]]


def test_drafter_overfits_a_handful_of_samples(tmp_path):
    store = make_store(tmp_path / "s", n_train=4)
    mod = module(store, ttt_steps=3).train()
    b = feature_batch(store, "train")
    opt = torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(400):
        metrics = mod.losses(b, train=True)
        if all(metrics[f"acc_{k}"] == 1.0 for k in range(3)):
            break
        opt.zero_grad()
        metrics["loss"].backward()
        opt.step()
    assert metrics["top1"] == 1.0 and all(metrics[f"acc_{k}"] == 1.0 for k in range(3))


def test_padding_does_not_change_the_loss(tmp_path):
    store = make_store(tmp_path / "s")
    mod = module(store).eval()
    b = feature_batch(store, "train")
    pad = torch.arange(b["tokens"].shape[1]) >= b["length"][:, None]
    assert pad.any()
    noisy = {**b, "feats": b["feats"].masked_fill(pad[..., None], 7.0),
             "final": b["final"].masked_fill(pad[..., None], -3.0), "tokens": b["tokens"].masked_fill(pad, 5)}
    with torch.no_grad():
        torch.testing.assert_close(mod.losses(noisy, False)["loss"], mod.losses(b, False)["loss"])


@pytest.mark.parametrize("source,width", [("target", 3 * H), ("both", 3 * H + 3 * 16)])
def test_feature_sources_set_the_fc_input(tmp_path, source, width):
    from conftest_train import TINY_EAGLE3, train_config
    store = make_store(tmp_path / "s")
    cfg = train_config(store, tmp_path / "run", *TINY_EAGLE3, f"adapter.feature_source={source}")
    c = Eagle3Type().configure(dict(cfg.adapter), FeatureStore(store), "train")
    assert c.fc_in_features == width and c.feature_names[:3] == NAMES
