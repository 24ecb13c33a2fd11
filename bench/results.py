"""One results writer for the benches: `<stem>.json` (the whole result), `<stem>.md` (its markdown table) and,
optionally, `<stem>.png`, each written atomically with regtune's own writer (`regtune.experiments.io.write_atomic`),
so a killed bench never leaves a half-written file."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from regtune.experiments.io import write_atomic


def json_ready(obj: Any) -> Any:
    """`obj` with string keys, lists for tuples and `None` for non-finite floats (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_results(stem: str, result: dict, table: str, plot: Callable[[dict, str], Any] | None = None) -> list[str]:
    """Write `stem`.json, `stem`.md and (with `plot(result, path)`) `stem`.png; print the table; return the paths."""
    paths = [stem + ".json", stem + ".md"]
    write_atomic(paths[0], json_ready(result))
    write_atomic(paths[1], table)
    if plot is not None:
        plot(result, stem + ".png")
        paths.append(stem + ".png")
    print(table)
    print("wrote " + ", ".join(paths))
    return paths


def mean_std(values) -> tuple[float, float]:
    """Mean and population std of the finite values (`nan, nan` when there are none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def fmt_mean_std(values, digits: int = 3) -> str:
    """`"mean ± std"` of the finite values, or `"–"` when there are none."""
    mean, std = mean_std(values)
    return "–" if mean != mean else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    """A markdown table; `align` per column: `"l"` (default) or `"r"`."""
    align = align or ["l"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
