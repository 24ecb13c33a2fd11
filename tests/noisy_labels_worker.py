"""Worker of tests/test_noisy_labels.py's DDP test: ELR or PS-KD in 2 gloo processes (torchrun), one epoch of the
12-example data set at 2 examples per process per step; each process writes its regularizer state."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_noisy_labels import args, tiny_dataset, tiny_model  # noqa: E402

from regtune.regularizers import ELR, PSKD  # noqa: E402
from regtune.trainers import RegTrainer  # noqa: E402


def main(out: str, method: str) -> None:
    reg = ELR() if method == "elr" else PSKD()
    training = args(out, per_device_train_batch_size=2, num_train_epochs=1, save_strategy="steps", save_steps=3)
    trainer = RegTrainer(model=tiny_model(), args=training, train_dataset=tiny_dataset(), regularizers=[reg])
    trainer.train()
    state = {"world_size": dist.get_world_size() if dist.is_initialized() else 1, **reg.state_dict()}
    torch.save(state, os.path.join(out, f"state_{trainer.args.process_index}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
