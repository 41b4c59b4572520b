"""Combination strategies on hand-made router probabilities."""
from __future__ import annotations

import pytest
import torch

from ddm_trainer.combine import Strategy, expert_weights, mixture_assignment, parse_strategy, routed_counts
from ddm_trainer.errors import ConfigError

P = torch.tensor([
    [0.50, 0.30, 0.15, 0.05],
    [0.05, 0.10, 0.25, 0.60],
    [0.25, 0.25, 0.25, 0.25],
], dtype=torch.float64)


@pytest.mark.parametrize("text,expected", [
    ("full", Strategy("full")),
    ("top1", Strategy("top", k=1)),
    ("top-1", Strategy("top", k=1)),
    ("Top-2", Strategy("top", k=2)),
    ("sample-2", Strategy("sample", k=2)),
    ("sample-3@0.5", Strategy("sample", k=3, temperature=0.5)),
    ("nucleus-0.9", Strategy("nucleus", mass=0.9)),
    ("nucleus-0.8@2", Strategy("nucleus", mass=0.8, temperature=2.0)),
    ("oracle-3", Strategy("oracle", cluster=3)),
    ("oracle", Strategy("mixture")),
])
def test_parse_and_name_round_trip(text: str, expected: Strategy):
    s = parse_strategy(text)
    assert s == expected
    assert parse_strategy(s.name) == s


@pytest.mark.parametrize("text", ["best", "top-0", "top-", "nucleus-1.5", "nucleus-0", "sample-2@0", "top-2@0.5",
                                  "oracle-", "oracle@2", "nucleus-0.9.1", ""])
def test_unknown_or_invalid_strategy_is_config_error_naming_it(text: str):
    with pytest.raises(ConfigError) as err:
        parse_strategy(text)
    assert repr(text) in str(err.value)


def test_check_against_expert_count():
    with pytest.raises(ConfigError, match="top-5.*only 4"):
        parse_strategy("top-5").check(4)
    with pytest.raises(ConfigError, match="oracle-4.*4 experts"):
        parse_strategy("oracle-4").check(4)
    parse_strategy("top-4").check(4)


def test_full_is_p():
    w = expert_weights(P, parse_strategy("full"))
    assert torch.allclose(w, P)


def test_top1_and_top2():
    w1 = expert_weights(P[:2], parse_strategy("top1"))
    assert torch.equal(w1, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]], dtype=torch.float64))
    w2 = expert_weights(P[:2], parse_strategy("top-2"))
    assert torch.allclose(w2, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0.25 / 0.85, 0.6 / 0.85]], dtype=torch.float64))
    assert routed_counts(w1) == [1, 0, 0, 1]  # experts 0 and 3 evaluated, on one sample each
    assert routed_counts(w2) == [1, 1, 1, 1]
    assert routed_counts(expert_weights(P[:1], parse_strategy("top-2"))) == [1, 1, 0, 0]


def test_nucleus_keeps_smallest_set_reaching_the_mass():
    w = expert_weights(P[:2], parse_strategy("nucleus-0.8"))
    # row 0: 0.5 < 0.8, 0.5+0.3 = 0.8 reaches it -> {0, 1}; row 1: 0.6, then +0.25 -> {3, 2}
    assert torch.allclose(w, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0.25 / 0.85, 0.6 / 0.85]], dtype=torch.float64))
    w_small = expert_weights(P[:2], parse_strategy("nucleus-0.4"))
    assert torch.equal(w_small > 0, torch.tensor([[True, False, False, False], [False, False, False, True]]))
    assert torch.allclose(expert_weights(P, parse_strategy("nucleus-1")), P)


def test_nucleus_temperature_sharpens_before_selecting():
    # T=0.25 raises p to the 4th power: expert 0 alone then holds 0.0625 / 0.0711 = 0.88 >= 0.8
    w = expert_weights(P[:1], parse_strategy("nucleus-0.8@0.25"))
    assert torch.equal(w, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64))
    w_flat = expert_weights(P[:1], parse_strategy("nucleus-0.8@4"))  # flatter: needs more experts
    assert int((w_flat > 0).sum()) >= 3


def test_sample_k_draws_k_distinct_experts_proportionally_and_is_seeded():
    p = P[:1].expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    w = expert_weights(p, parse_strategy("sample-1"), gen)
    assert torch.equal((w > 0).sum(1), torch.ones(20000, dtype=torch.long))
    freq = (w > 0).double().mean(0)
    assert torch.allclose(freq, P[0], atol=0.02)
    w2 = expert_weights(P, parse_strategy("sample-2"), torch.Generator().manual_seed(1))
    assert torch.equal((w2 > 0).sum(1), torch.full((3,), 2))
    assert torch.allclose(w2.sum(1), torch.ones(3, dtype=torch.float64))
    # weights are p renormalised over the drawn pair
    for row, prow in zip(w2, P):
        kept = row > 0
        assert torch.allclose(row[kept], prow[kept] / prow[kept].sum())
    again = expert_weights(P, parse_strategy("sample-2"), torch.Generator().manual_seed(1))
    assert torch.equal(w2, again)
    # a low temperature concentrates the draw on the argmax
    cold = expert_weights(p, parse_strategy("sample-1@0.05"), torch.Generator().manual_seed(2))
    assert (cold[:, 0] > 0).double().mean() > 0.99


def test_sample_k_with_zero_probabilities_still_draws_k():
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    w = expert_weights(p, parse_strategy("sample-3"), torch.Generator().manual_seed(0))
    assert int((w > 0).sum()) >= 1 and torch.allclose(w.sum(1), torch.ones(1, dtype=torch.float64))
    assert w[0, 0] == 1.0


def test_oracle_is_one_hot_and_rows_sum_to_one_for_all():
    w = expert_weights(P, parse_strategy("oracle-2"))
    assert torch.equal(w, torch.tensor([[0, 0, 1.0, 0]] * 3, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    for name in ["full", "top1", "top-3", "sample-2", "nucleus-0.5", "nucleus-0.95@0.7", "oracle-0"]:
        w = expert_weights(P, parse_strategy(name), gen)
        assert torch.allclose(w.sum(1), torch.ones(3, dtype=torch.float64)), name
        assert (w >= 0).all(), name


def test_the_mixture_oracle_draws_each_samples_expert_from_its_class_share():
    counts = torch.tensor([[30, 0, 5], [10, 0, 0], [0, 8, 0]])  # (K=3 clusters, C=3 classes)
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 4000 + [1] * 50 + [2] * 50)
    k = mixture_assignment(counts, y, len(y), [0, 1, 2], gen)
    share0 = torch.bincount(k[:4000], minlength=3).double() / 4000
    assert torch.allclose(share0, torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64), atol=0.03)
    assert (k[4000:4050] == 2).all() and (k[4050:] == 0).all()  # class 1 lives in cluster 2 only, class 2 in 0
    # expert 2 missing: class 1 (only in cluster 2) falls back to the present clusters' sizes, 35 : 10
    k = mixture_assignment(counts, torch.tensor([1] * 2000), 2000, [0, 1], gen)
    assert set(k.tolist()) <= {0, 1} and abs(float((k == 0).double().mean()) - 35 / 45) < 0.04
    # no classes: p(k) from the sizes
    k = mixture_assignment(torch.tensor([1, 0, 3]), None, 4000, [0, 1, 2], gen)
    assert (k != 1).all() and abs(float((k == 2).double().mean()) - 0.75) < 0.03
    with pytest.raises(ConfigError, match="oracle.*label 3"):
        mixture_assignment(counts, torch.tensor([3]), 1, [0, 1, 2], gen)
    with pytest.raises(ConfigError, match="per sample"):
        expert_weights(torch.full((2, 3), 1 / 3), parse_strategy("oracle"))
