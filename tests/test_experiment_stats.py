import math
import statistics

import pytest

from regtune.experiments.stats import format_ci, mean_ci, paired_difference, t_quantile


def test_t_quantile_matches_the_table():
    assert t_quantile(4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(19) == pytest.approx(2.0930, abs=1e-4)


def test_mean_ci_is_the_t_interval():
    values = [1.0, 2.0, 4.0, 7.0]
    got = mean_ci(values)
    half = 3.1824 * statistics.stdev(values) / 2
    assert got["mean"] == 3.5 and got["n"] == 4
    assert got["lo"] == pytest.approx(3.5 - half, abs=1e-3) and got["hi"] == pytest.approx(3.5 + half, abs=1e-3)
    assert math.isnan(mean_ci([1.0])["lo"])


def test_paired_difference_uses_common_seeds_only():
    got = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.85, 1: 0.8, 3: 0.1})
    assert got["seeds"] == [0, 1] and got["diffs"] == pytest.approx([0.05, 0.0])
    assert got["wins"] == 1 and got["ties"] == 1
    assert "[" in format_ci(got) and format_ci({"mean": 0.1, "lo": float("nan"), "hi": float("nan")}) == "+0.100"
