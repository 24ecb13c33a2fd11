"""The performance suite's harness (bench/perf.py): paired ratios, trainers run strictly in turn, the goals table."""

import importlib
import threading

import pytest

from bench import perf


perf_variants = importlib.import_module("bench.perf_variants")


def test_paired_ratio_is_the_median_of_the_per_round_ratios():
    q = perf.paired([2.0, 4.0, 9.0, 1.0], [1.0, 1.0, 3.0, 1.0])  # per-round ratios 2, 4, 3, 1
    assert q["median"] == 2.5
    assert q["n"] == 4
    assert q["q25"] <= q["median"] <= q["q75"]


def test_time_group_runs_the_shipped_trainers_one_step_at_a_time(monkeypatch):
    variants = [
        perf_variants.Variant("lora", perf_variants.b_lora, "lora", "lora", diagnostics=None),
        *perf_variants._pair("allora (gradient)", perf_variants.b_allora("gradient"), "lora"),
        perf_variants.Variant("glad", perf_variants.b_glad, "lora", "glad", diagnostics=None, floor="two passes"),
        perf_variants.Variant("two passes", perf_variants.b_lora_two_passes, "lora", "two passes", diagnostics=None),
    ]
    monkeypatch.setitem(perf_variants.GROUPS, "test", variants)
    monkeypatch.setitem(
        perf_variants.WIDTHS,
        "test",
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1),
    )
    lock, state = threading.Lock(), {"running": 0, "most": 0, "steps": 0}

    class CheckedBaton(perf.Baton):
        def on_step_begin(self, args, state_, control, **kwargs):
            super().on_step_begin(args, state_, control, **kwargs)
            with lock:
                state["running"] += 1
                state["steps"] += 1
                state["most"] = max(state["most"], state["running"])

        def _close(self):
            if self._t0 is not None:
                with lock:
                    state["running"] -= 1
            super()._close()

    monkeypatch.setattr(perf, "Baton", CheckedBaton)
    threads_before = threading.active_count()
    result = perf.time_group("test", "test", "2x8", warmup=1, rounds=3, log=lambda message: None)

    assert state["most"] == 1  # never two trainers computing at once
    assert state["steps"] == 5 * (1 + 3 + 1)  # warm-up, timed rounds and the closing step of each trainer
    assert threading.active_count() == threads_before  # every trainer thread finished
    row = result["allora (gradient)"]
    assert "error" not in row and "error" not in result["lora"]
    assert row["time_ratio"]["n"] == 3 and row["cpu_ratio"]["n"] == 3
    assert row["diag_on_off_ratio"]["n"] == 3
    assert row["diag_log_s"]["n"] == 3 and row["diag_log_fraction"] > 0
    assert row["diag_log_fraction_every_10"] == pytest.approx(row["diag_log_fraction"] / 10)
    assert "time_ratio" not in result["lora"]  # the baseline is not compared with itself
    # ALLoRA's coefficient refresh is timed once per step; GLAD is compared with its two-pass floor
    assert row["refresh_s"]["n"] == 3 and 0 < row["refresh_fraction"] < 1
    assert "refresh_s" not in result["lora"] and "refresh_s" not in result["glad"]
    assert result["glad"]["time_ratio_vs_floor"]["n"] == 3
    assert result["two passes"]["time_ratio"]["n"] == 3 and "time_ratio_vs_floor" not in result["two passes"]
    lines = perf.floors_table(
        {"rows": [{**r, "method": name, "width": "test", "size": "2x8"} for name, r in result.items()]}
    )
    assert any(line.startswith("| glad: time / the same two passes without the method | ") for line in lines)
    assert any(line.startswith("| allora (gradient): coefficient refresh, % of the step | ") for line in lines)


def test_goals_table_marks_missed_goals():
    row = {
        "method": "glad",
        "width": "small",
        "size": "4x16",
        "time_ratio": {"median": 1.9, "q25": 1.8, "q75": 2.0, "n": 3},
        "memory": {"tensor_extra_in_trainable_copies": 0.5},
    }
    lines = perf.targets_table({"rows": [row]})
    time_line = next(line for line in lines if line.startswith("| GLAD time"))
    memory_line = next(line for line in lines if line.startswith("| GLAD peak tensors"))
    assert "**1.90**" in time_line  # over the 1.8 goal
    assert "0.50" in memory_line and "**" not in memory_line


def test_report_only_rewrites_the_tables_between_the_docs_markers(tmp_path):
    """`--report-only --docs PAGE` rebuilds the tables from the JSON and replaces only the text between the markers;
    a page without them is refused."""
    import json
    import os

    import pytest

    committed = os.path.join(os.path.dirname(perf.__file__), "results", "perf.json")
    with open(committed) as f:
        result = json.load(f)
    (tmp_path / "perf.json").write_text(json.dumps(result))
    page = tmp_path / "page.md"
    page.write_text(f"# Before\n\n{perf.DOCS_BEGIN}\nstale table\n{perf.DOCS_END}\n\nAfter.\n")
    perf.main(["--report-only", "--out", str(tmp_path), "--docs", str(page)])
    text = page.read_text()
    assert text.startswith("# Before\n") and text.endswith("\nAfter.\n") and "stale table" not in text
    assert perf.markdown(result).strip() in text
    assert (tmp_path / "perf.md").read_text() == perf.markdown(result)
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="no"):
        perf.main(["--report-only", "--out", str(tmp_path), "--docs", str(bare)])


def test_noisy_group_times_elr_and_pskd_against_ce_and_reports_their_buffers(monkeypatch):
    """`--groups noisy`: ELR and PS-KD in the RegTrainer against the same trainer without them (plain cross-entropy),
    with the size of their per-example buffers; the 1.05x goal is shown only when they ran."""
    monkeypatch.setattr(perf_variants, "NUM_EXAMPLES", 24)
    monkeypatch.setitem(
        perf_variants.WIDTHS,
        "test",
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1),
    )
    result = perf.time_group("noisy", "test", "2x8", warmup=1, rounds=2, log=lambda message: None)

    for name in ("elr", "pskd", "elr (buffer on cpu)"):
        assert "error" not in result[name], result[name]
        assert result[name]["time_ratio"]["n"] == 2
    assert "time_ratio" not in result["ce"] and "buffers" not in result["ce"]
    assert result["elr"]["diag_on_off_ratio"]["n"] == 2
    classes = perf_variants.NUM_LABELS
    assert result["elr"]["buffers"]["elr/targets"]["shape"] == [24, classes]
    assert result["elr"]["buffers"]["elr/targets"]["bytes"] == 24 * classes * 4
    assert result["elr (buffer on cpu)"]["buffers"]["elr/targets"]["device"] == "cpu"
    assert result["pskd"]["buffers"]["pskd/predictions"]["bytes"] == 24 * classes * 4
    rows = [{**r, "method": name, "width": "test", "size": "2x8"} for name, r in result.items()]
    goals = perf.targets_table({"rows": rows})
    assert any(line.startswith("| ELR time <= 1.05x CE | ") for line in goals)
    assert any(line.startswith("| PS-KD time <= 1.05x CE | ") for line in goals)
    assert not any("1.05x CE" in line for line in perf.targets_table({"rows": rows[:1]}))  # CE alone: no goal
    assert any("| elr/targets | 24 x " in line for line in perf.buffers_table({"rows": rows}))
