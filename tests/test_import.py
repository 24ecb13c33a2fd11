"""`import regtune` registers the adapter types and stays light: trl and the Trainer load on first use."""

from __future__ import annotations

import subprocess
import sys

import regtune


def test_import_is_light_and_every_public_name_resolves():
    code = (
        "import sys, regtune, peft; "
        "assert 'ALLORA' in peft.PeftType.__members__ and 'GLAD' in peft.PeftType.__members__; "
        "heavy = [m for m in ('trl', 'transformers.trainer', 'regtune.trainers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    for name in regtune.__all__:
        assert getattr(regtune, name) is not None, name
    assert set(regtune.__all__) <= set(dir(regtune))
    assert regtune.RegTrainer.__module__ == "regtune.trainers.reg_trainer"
