"""bench.glad_evidence: the paired statistics and the lr / control choice (no model is trained)."""

import math
import statistics

import pytest

from bench.glad_evidence import choose_lrs, summarize, t_interval


def test_t_interval_matches_the_formula():
    diffs = [0.01, 0.05, -0.02, 0.04]
    mean, lo, hi = t_interval(diffs)
    half = 3.182446305284263 * statistics.stdev(diffs) / math.sqrt(4)  # t_{0.975, 3}
    assert mean == pytest.approx(0.02)
    assert (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
    assert math.isnan(t_interval([0.1])[1])


def _val(method, lr, acc, ce=1.0):
    return {(method, lr): [{"val_acc": acc, "val_ce": ce}]}


def test_choose_lrs_best_by_accuracy_then_ce_and_matched_control_below_the_lora_best():
    val = {
        **_val("lora", 3e-4, 0.50),
        **_val("lora", 1e-3, 0.62),
        **_val("lora", 3e-3, 0.70, ce=0.9),
        **_val("lora", 1e-2, 0.70, ce=1.5),  # tie on accuracy, higher CE: loses
        **_val("glad", 1e-3, 0.55),
        **_val("glad", 3e-3, 0.60),
    }
    choice = choose_lrs(val, "lora", "glad")
    assert (choice["lora_lr"], choice["glad_lr"]) == (3e-3, 3e-3)
    assert choice["matched_lr"] == 1e-3  # |0.62 - 0.60| < |0.50 - 0.60|; 1e-2 is above the LoRA best
    assert choose_lrs({**_val("lora", 1e-3, 0.7), **_val("glad", 1e-3, 0.6)}, "lora", "glad")["matched_lr"] is None


def test_summarize_pairs_only_common_seeds():
    def run(base, novel):
        return {"base": base, "novel": novel, "H": 2 * base * novel / (base + novel), "all": 0.5, "train_s": 1.0}

    configs = {"glad": {"method": "g", "lr": 1e-3}, "lora": {"method": "lora", "lr": 1e-3}}
    runs = {
        "glad": {0: run(0.7, 0.8), 1: run(0.6, 0.9), 2: run(0.5, 0.5)},
        "lora": {0: run(0.8, 0.7), 1: run(0.7, 0.7)},
    }
    pair = summarize(configs, runs, [0, 1, 2])["pairs"][0]
    assert pair["seeds"] == [0, 1]
    assert pair["novel"]["diffs"] == pytest.approx([0.1, 0.2])
    assert pair["base"]["diffs"] == pytest.approx([-0.1, -0.1])
    assert pair["novel"]["wins"] == 2 and pair["base"]["wins"] == 0
