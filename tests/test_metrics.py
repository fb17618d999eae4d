"""The acceptance metric: hand-checked rounds, edge cases at the end of a response."""

import torch
from specalign.specdec.metrics import Acceptance, make_round, raw_draft_proposer, simulate_greedy


def test_perfect_drafter_accepts_everything_up_to_the_end():
    target = list(range(10, 22))  # n = 12
    rounds = simulate_greedy(target, lambda p, g: target[p:p + g], gamma=5)
    # rounds start at 0, 6 (5 accepted + bonus), then 12 - 6 = 6 left: 5 accepted + bonus
    assert [(r.start, r.accepted, r.generated) for r in rounds] == [(0, 5, 6), (6, 5, 6)]
    acc = Acceptance(5)
    acc.add_sample(rounds)
    assert acc.tau == 6.0 and acc.alpha == 1.0 and acc.alpha_at == [1.0] * 5


def test_last_round_counts_only_tokens_inside_the_response():
    target = [1, 2, 3, 4, 5, 6, 7]  # n = 7
    rounds = simulate_greedy(target, lambda p, g: target[p:p + g] + [99] * g, gamma=4)
    # p=0: 4 accepted + bonus -> p=5; remaining 2: proposes 2 useful, accepts 2, generates 2
    assert [(r.start, r.proposed, r.accepted, r.generated) for r in rounds] == [(0, 4, 4, 5), (5, 2, 2, 2)]
    acc = Acceptance(4)
    acc.add_sample(rounds)
    assert acc.tokens == 7 and acc.rounds == 2 and acc.tau == 3.5
    assert acc.alpha == 6 / 6
    # position 2 and 3 were reached only in the first round
    assert acc.reached_at == [2, 2, 1, 1]


def test_wrong_drafter_gives_one_token_per_round():
    target = [5, 6, 7, 8]
    rounds = simulate_greedy(target, lambda p, g: [0] * g, gamma=3)
    acc = Acceptance(3)
    acc.add_sample(rounds)
    assert acc.tau == 1.0 and acc.alpha == 0.0 and acc.rounds == 4
    assert acc.reached_at == [4, 0, 0]
    assert acc.alpha_at == [0.0, None, None]


def test_partial_acceptance_and_alpha_at():
    target = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    draft = [1, 2, 0, 4, 5, 6, 7, 8, 9]   # wrong at position 2
    rounds = simulate_greedy(target, raw_draft_proposer(draft), gamma=3)
    # p=0: [1,2,0] -> a=2, +bonus -> p=3; p=3: [4,5,6] a=3 -> p=7; p=7: [8,9] a=2 gen=2
    assert [(r.start, r.accepted, r.generated) for r in rounds] == [(0, 2, 3), (3, 3, 4), (7, 2, 2)]
    acc = Acceptance(3)
    acc.add_sample(rounds)
    assert acc.alpha == 7 / 8
    assert acc.alpha_at == [1.0, 1.0, 0.5]


def test_make_round_caps_the_proposal_at_the_response_end():
    r = make_round([3, 4, 5, 6], [1, 2, 3, 4], start=2, gamma=4)
    assert (r.proposed, r.accepted, r.generated) == (2, 2, 2)


def test_merge_is_the_same_as_one_accumulator():
    t1, t2 = [1, 2, 3, 4, 5], [9, 8, 7]
    prop = lambda p, g: [1, 2, 0, 4, 5][p:p + g]
    a, b, both = Acceptance(2), Acceptance(2), Acceptance(2)
    a.add_sample(simulate_greedy(t1, prop, 2))
    b.add_sample(simulate_greedy(t2, prop, 2))
    both.add_sample(simulate_greedy(t1, prop, 2))
    both.add_sample(simulate_greedy(t2, prop, 2))
    assert a.merge(b).summary() == both.summary()


def test_expected_accept_is_overlap_of_distributions():
    from specalign.specdec.metrics import expected_accept
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert torch.isclose(expected_accept(p, q), torch.tensor(0.5))
    assert torch.isclose(expected_accept(p, p), torch.tensor(1.0))


def test_rounds_from_runs_are_the_rounds_of_the_round_by_round_walk():
    """Token lists shorter, as long and longer than the response, at every gamma: the runs of a list
    (`token_runs`) walked by `rounds_from_runs` give exactly `simulate_greedy`'s rounds."""
    from specalign.specdec.metrics import rounds_from_runs, token_runs

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, m = int(torch.randint(1, 15, (1,), generator=g)), int(torch.randint(0, 18, (1,), generator=g))
        target = torch.randint(0, 3, (n,), generator=g).tolist()       # a small alphabet: many matches
        draft = torch.randint(0, 3, (m,), generator=g).tolist()
        for gamma in (1, 2, 4, 7):
            expected = simulate_greedy(target, raw_draft_proposer(draft), gamma)
            assert rounds_from_runs(*token_runs(draft, target), n, gamma) == expected, (target, draft, gamma)


def test_match_runs_counts_consecutive_hits_from_each_position():
    from specalign.specdec.metrics import match_runs

    hit = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert match_runs(hit).tolist() == [[2, 1, 0, 3, 2, 1], [0, 0, 0, 0, 0, 1]]
