"""`importance_correlations` (hf_ewc/importance/correlation.py) on inputs whose correlations are known."""

import math

import numpy as np
import pytest
import torch

from hf_ewc import HfEwcError
from hf_ewc.importance.correlation import average_ranks, correlation, importance_correlations


def _reference_spearman(x, y) -> float:
    """Spearman's ρ written out: average ranks by brute force, then Pearson of the ranks."""

    def ranks(v):
        v = np.asarray(v, dtype=float)
        return np.array([np.sum(v < a) + (np.sum(v == a) + 1) / 2 for a in v])

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 0.0, 3.0])).tolist() == [4.0, 2.0, 4.0, 1.0, 4.0]


def test_known_relations_give_known_coefficients():
    x = torch.rand(500, generator=torch.Generator().manual_seed(0)) + 0.1
    linear = correlation(x, 2 * x + 1)
    assert linear["pearson"] == pytest.approx(1.0) and linear["spearman"] == pytest.approx(1.0)
    flipped = correlation(x, -x + 5)
    assert flipped["pearson"] == pytest.approx(-1.0) and flipped["spearman"] == pytest.approx(-1.0)
    cubic = correlation(x, x**3)  # monotone, not linear: ranks agree exactly, values do not
    assert cubic["spearman"] == pytest.approx(1.0) and 0.8 < cubic["pearson"] < 0.99
    power = correlation(x, 7 * x**2.5)  # log(Ω) is linear in log(x) up to the tiny ε
    assert power["pearson_log"] == pytest.approx(1.0, abs=1e-4)
    independent = correlation(torch.rand(20000, generator=torch.Generator().manual_seed(1)),
                              torch.rand(20000, generator=torch.Generator().manual_seed(2)))  # fmt: skip
    assert abs(independent["pearson"]) < 0.03 and abs(independent["spearman"]) < 0.03
    assert correlation(x, torch.ones_like(x))["pearson"] is None  # undefined for a constant


def test_spearman_with_ties_equals_the_written_out_reference():
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0, 0.0, 3.0])  # many exact zeros, as in pruned or dead units
    y = torch.tensor([0.1, 0.0, 0.3, 0.3, 2.0, 1.0, 4.0, 0.0, 3.0])
    assert correlation(x, y)["spearman"] == pytest.approx(_reference_spearman(x, y), abs=1e-12)


def test_per_parameter_and_global_and_a_seeded_subsample():
    g = torch.Generator().manual_seed(3)
    a = {"w1": torch.rand(40, 30, generator=g), "w2": torch.rand(50, generator=g)}
    b = {"w1": a["w1"] * 3, "w2": torch.rand(50, generator=g)}  # agrees on w1, independent on w2
    c = {"w1": -a["w1"], "w2": a["w2"] ** 2}
    report = importance_correlations({"a": a, "b": b, "c": c}, max_rank_samples=1000)
    assert report["pairs"] == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert report["per_parameter"]["w1"]["a|b"]["pearson"] == pytest.approx(1.0)
    assert report["per_parameter"]["w1"]["a|c"]["spearman"] == pytest.approx(-1.0)
    assert report["per_parameter"]["w2"]["a|c"]["spearman"] == pytest.approx(1.0)
    assert abs(report["per_parameter"]["w2"]["a|b"]["pearson"]) < 0.5
    assert report["sampled"] == {"w1": 1000, "w2": 50, "(global)": 1000}  # 1200 and 1250 values: subsampled
    flat = {m: torch.cat([v["w1"].reshape(-1), v["w2"]]) for m, v in (("a", a), ("b", b))}
    draws = torch.Generator().manual_seed(0)  # the positions the report used: w1's draw, then the global one
    torch.randperm(1200, generator=draws)
    keep = torch.randperm(1250, generator=draws)[:1000]
    assert report["global"]["a|b"] == correlation(flat["a"][keep], flat["b"][keep])
    full = correlation(flat["a"], flat["b"])
    again = importance_correlations({"a": a, "b": b, "c": c}, max_rank_samples=1000)
    assert again == report  # the subsample is seeded
    assert math.isclose(importance_correlations({"a": a, "b": b})["global"]["a|b"]["pearson"], full["pearson"])


def test_bad_input_names_the_problem():
    a = {"w": torch.rand(4)}
    with pytest.raises(HfEwcError, match="at least two methods"):
        importance_correlations({"fisher": a})
    with pytest.raises(HfEwcError, match="cover different parameters \\(first: 'v'\\)"):
        importance_correlations({"fisher": a, "mas": {"v": torch.rand(4)}})
    with pytest.raises(HfEwcError, match="'w' has shape \\(4,\\) under 'fisher' but \\(2, 2\\) under 'mas'"):
        importance_correlations({"fisher": a, "mas": {"w": torch.rand(2, 2)}})
    with pytest.raises(HfEwcError, match="The 'mas' importance of 'w' holds NaN/Inf"):
        importance_correlations({"fisher": a, "mas": {"w": torch.tensor([1.0, math.nan, 0.0, 1.0])}})


def test_agrees_with_scipy_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 6, (300,), generator=g).double()  # heavy ties
    y = x + torch.randint(0, 3, (300,), generator=g).double()
    got = correlation(x, y)
    assert got["spearman"] == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    assert got["pearson"] == pytest.approx(stats.pearsonr(x.numpy(), y.numpy()).statistic, abs=1e-12)
