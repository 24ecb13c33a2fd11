"""Pretrains the character-level Llama that `recipes/evidence/lfu.yaml` fine-tunes, and writes it where the recipe
reads it (`bench/models/char-llama-shakespeare`, committed, so that the recipe does not pay the pretraining).

No pretrained causal LM is available offline. This one (hidden 128, 4 blocks, 0.86M parameters, a character
tokenizer) is pretrained from a seeded random initialization on the first 90% of Tiny Shakespeare without the turns of
GLOUCESTER: the built-in task `shakespeare-turns` fine-tunes on those turns and measures forgetting on the last 10%.

    OMP_NUM_THREADS=2 python -m bench.char_llama [--steps 1500] [--out bench/models/char-llama-shakespeare]
"""

from __future__ import annotations

import os


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "models", "char-llama-shakespeare")
SHAPE = {
    "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "intermediate_size": 384, "max_position_embeddings": 512, "tie_word_embeddings": True,
}  # fmt: skip
PRETRAIN_STEPS = 1500
PRETRAIN_LR = 3e-3


def main() -> None:
    from bench._common import machine_description
    from bench.lfu import pretrain
    from regtune.data.shakespeare import pretraining_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    tmp = cli.out + ".tmp"
    info = pretrain(pretraining_text(), tmp, cli.steps, shape=SHAPE, lr=PRETRAIN_LR)
    info.update(shape=SHAPE, lr=PRETRAIN_LR, seed=0, threads=cli.threads, machine=machine_description("cpu"))
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.isdir(cli.out):
        import shutil

        shutil.rmtree(cli.out)
    os.replace(tmp, cli.out)
    print(f"wrote {cli.out} ({info['steps']} steps, last loss {info['last_loss']:.3f}, {info['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
