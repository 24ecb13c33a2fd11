"""
A recipe run from Python: LoRA against ALLoRA on a sentence classifier, each at the learning rate chosen from its
own sweep on the validation split (never on test), then trained on paired seeds and compared on the test split
(mean difference with a 95% interval). The recipe is the YAML below; the flags become overrides, as
`regtune run FILE --key.path=value` does on the command line. See docs/recipes.md.

    python examples/recipe_sweep.py                              # all-MiniLM-L6-v2 on SetFit/sst2 (downloads both)
    python examples/recipe_sweep.py --model google-bert/bert-base-uncased --seeds 0 1 2 3 4 5 6 7 8 9
"""

import argparse

import yaml

from regtune.experiments import load_recipe, run_recipe


RECIPE = """
kind: runs
name: recipe_sweep
description: LoRA vs ALLoRA, each at its learning rate chosen on validation, paired seeds.
seeds: [0, 1, 2]
select: {split: validation, metric: accuracy, seeds: [100]}   # sweep values are scored on validation, seed 100
compare: {baseline: lora, metrics: [test.accuracy]}           # paired differences allora - lora
model: {name_or_path: sentence-transformers/all-MiniLM-L6-v2}
data: {path: SetFit/sst2, max_train_samples: 512, max_eval_samples: 500, max_length: 64}
adapter: {type: LORA, r: 8, lora_alpha: 16, target_modules: [query, key, value, dense]}
training: {max_steps: 200, per_device_train_batch_size: 16, save_strategy: "no", report_to: none}
evaluation: {splits: [test], metrics: [accuracy]}
runs:
  - name: lora
    sweep: {training.learning_rate: [3.0e-4, 1.0e-3, 3.0e-3]}
  - name: allora
    adapter: {type: ALLORA, r: 8, eta: 2.0, target_modules: [query, key, value, dense]}
    sweep: {training.learning_rate: [3.0e-4, 1.0e-3, 3.0e-3]}
"""

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="a Hub id or a local folder")
parser.add_argument("--dataset", default="SetFit/sst2", help="train/validation/test splits with `text` and `label`")
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--max_steps", type=int, default=200)
parser.add_argument("--output_dir", default="out/recipe_sweep")
args = parser.parse_args()

overrides = {
    "model.name_or_path": args.model,
    "data.path": args.dataset,
    "seeds": args.seeds,
    "training.max_steps": args.max_steps,
    "output_dir": args.output_dir,
}
result = run_recipe(
    load_recipe(yaml.safe_load(RECIPE), overrides)
)  # resumable: finished (run, seed) pairs and sweep trials are kept
print(result.table)  # also in <output_dir>/results.md; every number in results.json
