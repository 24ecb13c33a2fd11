"""bench.lfu_evidence: the calibration's interpolation, the run names and the paired statistics (no model trained)."""

import json

import pytest

from bench.lfu_evidence import (
    cached_run,
    diagnostics,
    front_configs,
    loglog_interpolate,
    matched_forgetting,
    run_name,
    summarize,
)


def test_loglog_interpolate_inverts_a_power_law_and_picks_the_first_crossing():
    xs = [0.1, 0.3, 1.0, 3.0]
    ys = [0.02 * x**0.7 for x in xs]
    target = 0.02 * 0.5**0.7
    assert loglog_interpolate(xs, ys, target) == pytest.approx(0.5)
    assert loglog_interpolate(xs, ys, 0.02 * 10**0.7) == pytest.approx(10.0)  # extrapolated past the last point
    # not monotone (a too-large step overshoots): the first bracket that reaches the target decides
    assert loglog_interpolate([0.1, 1.0, 3.0], [0.01, 0.1, 0.05], 0.05) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 positive points"):
        loglog_interpolate([0.1, 1.0], [0.01, -1.0], 0.05)


def test_matched_forgetting_interpolates_and_flags_extrapolation():
    points = [(1.5, 0.08), (1.7, 0.02), (1.6, 0.05)]  # unordered on purpose
    assert matched_forgetting(points, 1.65) == (pytest.approx(0.035), False)
    value, extrapolated = matched_forgetting(points, 1.8)
    assert extrapolated and value == pytest.approx(-0.01)


def test_run_names_and_front_configs():
    assert run_name({"method": "sft", "lr": 1e-3}) == "sft_lr0.001"
    config = {"method": "lfu-perturb", "alpha": 0.3, "beta": 9.1, "lr": 2e-3, "max_steps": 10}
    assert run_name(config) == "lfu-perturb_a0.3_b9.1_lr0.002_steps10"
    lfu = {"perturb": (0.3, 9.1, None), "reps": (0.1, 2.0, [2e-3])}
    configs = front_configs([1e-3, 2e-3], lfu, sft_extra_lrs=[5e-4])
    assert [run_name(c) for c in configs] == [
        "sft_lr0.0005",
        "sft_lr0.001",
        "lfu-perturb_a0.3_b9.1_lr0.001",
        "sft_lr0.002",
        "lfu-perturb_a0.3_b9.1_lr0.002",
        "lfu-reps_a0.1_b2_lr0.002",
    ]


def test_diagnostics_average_only_the_logs_that_carry_them():
    logs = [
        {"loss": 2.0, "lfu/cons_to_sft": 0.1, "lfu/ascent_gain": 0.04},
        {"loss": 1.5, "lfu/cons_to_sft": 0.3},
        {"train_runtime": 3.0},
    ]
    out = diagnostics(logs)
    assert out["lfu/cons_to_sft"] == pytest.approx(0.2) and out["lfu/cons_to_sft_n"] == 2
    assert out["lfu/ascent_gain"] == pytest.approx(0.04) and out["lfu/ascent_gain_n"] == 1
    assert out["train_loss_last_log"] == 1.5 and "lfu/consistency" not in out


def _run(method, lr, seed, in_task, forgetting, **extra):
    config = {"method": method, "lr": lr}
    if method != "sft":
        config.update(alpha=0.3, beta=9.0)
    return {"config": config, "seed": seed, "in_task": in_task, "forgetting": forgetting, "train_s": 1.0, **extra}


def test_summarize_pairs_at_each_lr_and_at_matched_in_task_loss():
    runs = []
    deltas = {0: 0.010, 1: 0.020, 2: 0.030}
    for seed, shift in deltas.items():
        # SFT's front per seed: forgetting = 0.5 - 0.3 * in_task (a line through its three lrs)
        for lr, in_task in ((5e-4, 1.70), (1e-3, 1.60), (2e-3, 1.50)):
            runs.append(_run("sft", lr, seed, in_task, 0.5 - 0.3 * in_task))
        # LfU at 1e-3 fits less (1.65) and forgets `shift` less than SFT does at that fit
        runs.append(_run("lfu-perturb", 1e-3, seed, 1.65, 0.5 - 0.3 * 1.65 - shift, **{"lfu/cons_to_sft": 0.2}))
    runs.append(_run("sft", 2e-3, 3, 1.5, 0.05))  # a seed LfU lacks: not paired
    summary = summarize(runs, [5e-4, 1e-3, 2e-3])
    (paired,) = summary["paired_at_lr"]
    assert paired["sft"] == "sft_lr0.001" and paired["in_task"]["n"] == 3
    assert paired["in_task"]["mean"] == pytest.approx(0.05)
    assert paired["forgetting"]["mean"] == pytest.approx(-0.3 * 0.05 - 0.02)
    (matched,) = summary["matched_in_task"]
    assert matched["forgetting"]["mean"] == pytest.approx(-0.02)
    assert matched["forgetting"]["diffs"] == pytest.approx([-0.01, -0.02, -0.03])
    assert matched["extrapolated"] == []
    lfu = summary["configs"]["lfu-perturb_a0.3_b9_lr0.001"]
    assert lfu["lfu/cons_to_sft"]["mean"] == pytest.approx(0.2) and lfu["seeds"] == [0, 1, 2]
    assert summary["configs"]["sft_lr0.002"]["seeds"] == [0, 1, 2, 3]


def test_cached_run_reads_a_finished_run_and_never_trains_in_report_only_mode(tmp_path):
    path = tmp_path / "sft_lr0.001_s0.json"
    with pytest.raises(FileNotFoundError, match="report-only"):
        cached_run(str(path), {"method": "sft", "lr": 1e-3}, 0, {"corpus": 1.5}, train=False)
    path.write_text(json.dumps({"in_task": 1.6, "forgetting": 0.01}))
    assert cached_run(str(path), {"method": "sft", "lr": 1e-3}, 0, {"corpus": 1.5}, train=False)["in_task"] == 1.6
