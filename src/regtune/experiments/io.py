"""Files and processes of the engine: YAML as recipes read it, atomic JSON, and the main-process helpers."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import yaml


# PyYAML reads `1e-3` as a string (YAML 1.1). Recipes are full of learning rates, so read it as a float.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class RecipeLoader(yaml.SafeLoader):
    """
    `yaml.SafeLoader` with YAML 1.2 scalars: `1e-3` / `5E4` are floats, and only `true` / `false` are booleans, so
    `eval_strategy: no` and `--training.save_strategy=no` are the string `"no"` (YAML 1.1 reads `no` as false).
    """


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_RE, list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse YAML text with [`RecipeLoader`]."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


def dump_yaml(data: Any) -> str:
    """Dump plain data as block-style YAML, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=119)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_atomic(path: str, payload: Any) -> None:
    """
    Write `payload` (text, or JSON for anything else) to `path` through a temporary file and `os.replace`, so a
    reader (or a run killed meanwhile) never sees a partial file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(payload if isinstance(payload, str) else json.dumps(payload, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plain(data: Any) -> Any:
    """`data` as JSON would read it back (tuples become lists, ...): the form settings are compared in."""
    return json.loads(json.dumps(data))


def changed_fields(old: Any, new: Any, path: str = "") -> list[str]:
    """The key paths where two settings mappings differ, each with its old and new value (`a.b: 1 -> 2`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            out += changed_fields(old.get(key, "<unset>"), new.get(key, "<unset>"), sub)
        return out
    return [] if old == new else [f"{path or '<recipe>'}: {old!r} -> {new!r}"]


def is_main_process() -> bool:
    """Whether this is the main process (always true without `accelerate launch` / `torchrun`)."""
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:
        return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


def barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def has_accelerator() -> bool:
    """Whether torch sees a GPU / XPU / MPS device (pinned memory and `use_cpu` depend on it)."""
    import torch
    from accelerate.utils import is_mps_available, is_xpu_available

    return torch.cuda.is_available() or is_xpu_available() or is_mps_available()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class RecipeProgress:
    """
    Progress over a whole recipe, for a study of tens of trainings: after each training, one log line with the
    trainings done out of the total, the elapsed time and an estimate of the time left (the mean time of the
    trainings done so far in this invocation, times those left; results read back from disk count as done and take
    no time).
    """

    def __init__(self, total: int, log=print, what: str = "trainings"):
        import time

        self.total, self.log, self.what = max(int(total), 0), log, what
        self.done = self.trained = 0
        self.trained_seconds = 0.0
        self.start = time.perf_counter()

    def skip(self) -> None:
        """A training whose results were read back from disk."""
        self.done += 1

    def finished(self, seconds: float) -> None:
        """A training that took `seconds`; logs the progress line (main process only)."""
        import time

        self.done += 1
        self.trained += 1
        self.trained_seconds += seconds
        left = max(self.total - self.done, 0)
        eta = _duration(self.trained_seconds / self.trained * left) if left else "0m00s"
        if is_main_process():
            self.log(
                f"[regtune] progress: {self.done}/{self.total} {self.what}, elapsed "
                f"{_duration(time.perf_counter() - self.start)}, about {eta} left"
            )
