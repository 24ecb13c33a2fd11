"""
Regularizers on a plain `transformers.Trainer` setup (full fine-tuning, no adapter): multi-sample dropout (8 dropout
masks through the classifier head, losses averaged) and a dropout schedule (rate ramped from 0 to 0.1 over the first
half of training). They plug in two ways, shown one after the other: `regtune.RegTrainer` (a ready-made Trainer), and
`RegularizedTrainerMixin` put first in the bases of any Trainer class, here `transformers.Trainer` itself.

    python examples/regularizer_trainer.py                       # all-MiniLM-L6-v2 on SetFit/sst2 (downloads both)
    python examples/regularizer_trainer.py --model FacebookAI/roberta-base --max_steps 1000
"""

import argparse

import numpy as np
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from regtune import RegTrainer, RegularizedTrainerMixin
from regtune.regularizers import DropoutSchedule, MultiSampleDropout


class MyTrainer(RegularizedTrainerMixin, Trainer):  # the mixin goes first; works for trl's trainers too
    pass


parser = argparse.ArgumentParser()
parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="a Hub id or a local folder")
parser.add_argument("--dataset", default="SetFit/sst2", help="train/validation splits with `text` and `label`")
parser.add_argument("--max_steps", type=int, default=300)
parser.add_argument("--output_dir", default="out/regularizer_trainer")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
data = load_dataset(args.dataset).map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)

for trainer_class in (RegTrainer, MyTrainer):
    trainer = trainer_class(
        model=AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2),
        args=TrainingArguments(
            f"{args.output_dir}/{trainer_class.__name__}",
            max_steps=args.max_steps,
            learning_rate=5e-5,
            logging_steps=max(args.max_steps // 10, 1),
            report_to="none",
        ),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
        regularizers=[MultiSampleDropout(num_samples=8), DropoutSchedule(p=0.1, mode="linear", end_fraction=0.5)],
    )
    trainer.train()
    logged = [log for log in trainer.state.log_history if "dropout_schedule/p" in log]
    print(
        f"{trainer_class.__name__}: dropout rate over training {[round(log['dropout_schedule/p'], 3) for log in logged]}"
    )
    print(f"{trainer_class.__name__}: validation accuracy {trainer.evaluate()['eval_accuracy']:.3f}")
