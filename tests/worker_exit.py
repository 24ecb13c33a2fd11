"""Ends a torchrun test worker without interpreter teardown.

A worker whose training finished can still abort at interpreter exit ("terminate called without an active
exception", exit -6): a C++ thread of torch.distributed is still joinable when static destructors run. The
results are on disk by then, so the workers tear the process group down, flush and leave through ``os._exit``.
"""

import os
import sys
import traceback

import torch


def run_and_exit(main, *args) -> None:
    """Runs ``main(*args)``, destroys the process group and exits with 0, or 1 after printing the traceback."""
    code = 0
    try:
        main(*args)
    except SystemExit as stop:  # argparse and explicit exits keep their code
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:
        traceback.print_exc()
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
