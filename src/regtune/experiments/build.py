"""Turn a validated [`RunSpec`] into the objects a run needs: tokenizer, data, model (+ adapter), trainer.

The loading code is the one a user runs on Hub ids: `from_pretrained` on a Hub id, a local directory or a
built-in model (a directory inside an installed package), `datasets.load_dataset` on a Hub id or local files.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

from regtune.data.models import BUILTIN_MODELS, resolve_model_path

from .errors import RecipeError
from .finetune import BUILTIN_METRICS, DataSpec, ModelSpec, RunSpec, metric_args, metric_name, resolve_trainer


def hub_base_model(spec: ModelSpec) -> str | None:
    """The Hub id of the base model for model cards (`None` for local directories and models built from configs)."""
    if spec.name_or_path is None:
        return None
    if spec.name_or_path.startswith("builtin:"):
        return BUILTIN_MODELS[spec.name_or_path[len("builtin:") :]].hub_id
    if os.path.isdir(spec.name_or_path) or spec.name_or_path.startswith((".", "/", "~")):
        return None
    return spec.name_or_path


def takes_raw_data(run: RunSpec) -> bool:
    """
    Whether the run's trainer gets its data set untokenized: a causal-LM run whose `trainer:` is trl's `SFTTrainer`
    or a subclass (e.g. `LfUTrainer`). Such trainers take the data set as it is (language-modeling `text`,
    `prompt`/`completion`, conversational `messages`, ...) and tokenize and collate it themselves.
    """
    if run.task != "causal-lm":
        return False
    from trl import SFTTrainer

    return issubclass(resolve_trainer(run.trainer)[0], SFTTrainer)


def load_tokenizer(spec: ModelSpec, task: str):
    from transformers import AutoTokenizer

    source = resolve_model_path(spec.tokenizer or spec.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers: pad with EOS (masked out anyway)
    return tokenizer


@dataclass
class LoadedData:
    """The splits of a run's data set and what the runner needs to know about them."""

    splits: Any  # datasets.DatasetDict
    text_column: str
    text_pair_column: str | None
    label_column: str
    train_split: str
    eval_splits: dict[str, str]  # display name -> split
    label_names: list[str] | None
    class_descriptions: list[str] | None = None  # the built-in task's, one per label (a class-descriptions head)
    summarize: Any = None  # the built-in task's derived metrics ({split: metrics} -> {name: metrics})


def load_data(spec: DataSpec, task: str, evaluation, raw_format: bool = False) -> LoadedData:
    """
    Load a built-in task or `datasets.load_dataset(...)`, trimmed to `max_*_samples`, labels as integers.

    With `raw_format` (a trl SFT trainer), the columns are left to the trainer, which recognizes its formats.
    """
    from datasets import ClassLabel

    if spec.builtin is not None:
        from regtune.data import get_task

        builtin = get_task(spec.builtin)
        try:
            splits = builtin.build(**spec.options)
        except ValueError as e:
            raise RecipeError([("data.options", str(e))]) from None
        text_column = spec.text_column or builtin.text_column
        label_column = spec.label_column or builtin.label_column
        train_split = spec.train_split or builtin.train_split
        describe = builtin.class_descriptions
        descriptions = describe(**spec.options) if describe is not None else None
        summarize = builtin.summarize
    else:
        from datasets import load_dataset

        splits = load_dataset(spec.path, spec.name, data_files=spec.data_files, revision=spec.revision)
        text_column = spec.text_column or "text"
        label_column = spec.label_column or "label"
        train_split = spec.train_split or "train"
        descriptions = summarize = None

    if evaluation.splits is None:
        found = next((s for s in ("validation", "test") if s in splits), None)
        eval_splits = {found: found} if found else {}
    elif isinstance(evaluation.splits, dict):
        eval_splits = dict(evaluation.splits)
    else:
        eval_splits = {s: s for s in evaluation.splits}
    problems = []
    for path, split in [("data.train_split", train_split)] + [
        (f"evaluation.splits.{k}", v) for k, v in eval_splits.items()
    ]:
        if split not in splits:
            problems.append((path, f"no split {split!r} in the data set (splits: {', '.join(splits)})"))
    columns = splits[train_split].column_names if train_split in splits else []
    wanted = [("data.text_column", text_column), ("data.text_pair_column", spec.text_pair_column)]
    if raw_format:
        wanted = [("data.text_column", spec.text_column)]  # only a column the recipe names explicitly
    if task == "sequence-classification":
        wanted.append(("data.label_column", label_column))
    for path, column in wanted:
        if column is not None and columns and column not in columns:
            problems.append((path, f"no column {column!r} in the data set (columns: {', '.join(columns)})"))
    if problems:
        raise RecipeError(problems)

    def head(ds, n):
        return ds.select(range(min(n, len(ds)))) if n is not None else ds

    keep = {train_split: head(splits[train_split], spec.max_train_samples)}
    for split in eval_splits.values():
        keep[split] = head(splits[split], spec.max_eval_samples)

    label_names = None
    if task == "sequence-classification":
        feature = keep[train_split].features[label_column]
        values = sorted({v for ds in keep.values() for v in ds[label_column] if v is not None}, key=str)
        if isinstance(feature, ClassLabel):
            label_names = list(feature.names)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            label_names = [str(i) for i in range(max(values, default=-1) + 1)]  # integer labels are used as they are
        else:  # string labels: sorted names -> 0..n-1, stored as a ClassLabel
            label_names = [str(v) for v in values]
            index = {v: i for i, v in enumerate(values)}

            def encode(ds):
                features = ds.features.copy()
                features[label_column] = ClassLabel(names=label_names)
                return ds.map(lambda row: {label_column: index[row[label_column]]}, features=features)

            keep = {name: encode(ds) for name, ds in keep.items()}
    from datasets import DatasetDict

    return LoadedData(
        splits=DatasetDict(keep),
        text_column=text_column,
        text_pair_column=spec.text_pair_column,
        label_column=label_column,
        train_split=train_split,
        eval_splits=eval_splits,
        label_names=label_names,
        class_descriptions=descriptions,
        summarize=summarize,
    )


def tokenize_data(data: LoadedData, tokenizer, task: str, max_length: int):
    """Tokenize every split (no padding: the collator pads per batch); classification keeps `labels`."""

    def encode(batch):
        texts = [batch[data.text_column]]
        if data.text_pair_column:
            texts.append(batch[data.text_pair_column])
        out = tokenizer(*texts, truncation=True, max_length=max_length)
        if task == "sequence-classification":
            out["labels"] = batch[data.label_column]
        if "class_mask" in batch:  # the classes each example is classified among (a class-descriptions head)
            out["class_mask"] = batch["class_mask"]
        if "true_label" in batch:  # a noisy-label task's true labels (read by NoisyLabelMonitor, never by the model)
            out["true_label"] = batch["true_label"]
        return out

    return data.splits.map(
        encode, batched=True, remove_columns=data.splits[data.train_split].column_names, desc="Tokenizing"
    )


def data_collator(tokenizer, task: str):
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    if task == "causal-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)


def load_model(
    spec: ModelSpec, task: str, label_names: list[str] | None, tokenizer, descriptions=None, max_length: int = 128
):
    """
    `AutoModelFor<task>.from_pretrained(...)` (or `.from_config(...)` for `model.config`); call after seeding. With
    `head: class-descriptions`, an `AutoModel` encoder in a [`~regtune.data.dual_encoder.DualEncoderClassifier`]
    over the class `descriptions` (default: `spec.class_descriptions`, else the label names).
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
    if spec.head == "class-descriptions":
        auto = AutoModel
    head = {}
    if label_names is not None and spec.head is None:
        head = {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)},
        }
    if spec.config is not None:
        config_kwargs = dict(spec.config)
        model_type = config_kwargs.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_kwargs, **head)
        model = auto.from_config(config, trust_remote_code=spec.trust_remote_code)
        if spec.dtype not in (None, "auto"):
            model = model.to(getattr(torch, spec.dtype))
    else:
        kwargs = dict(spec.kwargs)
        if spec.dtype is not None:
            kwargs["dtype"] = spec.dtype if spec.dtype == "auto" else getattr(torch, spec.dtype)
        model = auto.from_pretrained(
            resolve_model_path(spec.name_or_path),
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            **head,
            **kwargs,
        )
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification on decoders needs it
    if spec.head == "class-descriptions":
        from regtune.data.dual_encoder import DualEncoderClassifier

        names = list(label_names or [])
        if spec.class_descriptions is not None:
            missing = [n for n in names if n not in spec.class_descriptions]
            if missing:
                raise RecipeError([("model.class_descriptions", f"no description of the labels {missing}")])
            descriptions = [spec.class_descriptions[n] for n in names]
        texts = list(descriptions or names)
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        encoded = {k: encoded[k] for k in ("input_ids", "attention_mask")}
        model = DualEncoderClassifier(model, encoded, scale=spec.logit_scale, prototypes=spec.prototypes)
    return model


def apply_adapter(model, run: RunSpec):
    """Wrap `model` with the run's peft adapter (`get_peft_model`); full fine-tuning returns `model` unchanged."""
    if run.adapter is None:
        return model
    from peft import get_peft_model

    import regtune  # noqa: F401  (registers regtune's adapter types with peft)

    return get_peft_model(model, run.adapter.build_config())


def count_parameters(model) -> tuple[int, int]:
    """`(trainable, total)` numbers of parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_metrics(run: RunSpec) -> dict:
    """
    `{name: evaluate module}` of the run's `evaluation.metrics` that are not built in, loaded with `evaluate.load`
    (from the Hub the first time, then from its cache; or a local folder). A failure raises [`RecipeError`] under the
    metric's key path, before anything is trained.
    """
    names = [(i, metric_name(m)) for i, m in enumerate(run.evaluation.metrics or [])]
    names = [(i, n) for i, n in names if n not in BUILTIN_METRICS]
    if not names or run.task != "sequence-classification":
        return {}
    try:
        import evaluate
    except ImportError as e:
        raise RecipeError(
            [(f"evaluation.metrics[{i}]", f"run {run.name!r}: the metric {n!r} needs the `evaluate` library: pip "
              "install 'regtune[metrics]' (or use the built-in accuracy, macro_f1)") for i, n in names]
        ) from e  # fmt: skip
    loaded = {}
    for i, name in names:
        try:
            loaded[name] = evaluate.load(name)
        except Exception as e:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ...
            text = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RecipeError(
                [(f"evaluation.metrics[{i}]", f"run {run.name!r}: cannot load the evaluate metric {name!r}: {text} "
                  "(an evaluate metric is downloaded from the Hub once, which needs the network, then read from its "
                  "cache; offline, name a local metric folder, or use the built-in accuracy, macro_f1)")]
            ) from e  # fmt: skip
    return loaded


def compute_classification_metrics(names, loaded: dict | None = None):
    """
    A `compute_metrics` function for the Trainer returning the metrics `names`: the built-in `accuracy` and
    `macro_f1`, and the results of the `evaluate` modules `loaded` (see [`load_metrics`]) on the argmax predictions,
    with the item's `args`. The result keys every call produced are kept in its attribute `keys`.
    """
    import numpy as np

    loaded = loaded or {}

    def compute(eval_pred):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        preds = np.asarray(logits).argmax(-1)
        labels = np.asarray(labels)
        out = {}
        if "accuracy" in names:
            out["accuracy"] = float((preds == labels).mean())
        if "macro_f1" in names:
            f1s = []
            for c in np.union1d(labels, preds):
                tp = np.sum((preds == c) & (labels == c))
                denom = np.sum(preds == c) + np.sum(labels == c)
                f1s.append(2 * tp / denom if denom else 0.0)
            out["macro_f1"] = float(np.mean(f1s))
        for i, item in enumerate(names):
            name = metric_name(item)
            if name not in loaded:
                continue
            args = metric_args(item)
            try:
                result = loaded[name].compute(predictions=preds.tolist(), references=labels.tolist(), **args)
            except (TypeError, ValueError) as e:
                text = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RecipeError(
                    [(f"evaluation.metrics[{i}]", f"the metric {name!r} with args {args}: {text}")]
                ) from e
            for key, value in (result or {}).items():
                if np.ndim(value) == 0 and isinstance(np.asarray(value).item(), (int, float)):
                    out[key] = float(value)  # per-class arrays (average: null) are not kept
        compute.keys.update(out)
        return out

    compute.keys = set()
    return compute


def build_optimizer(model, run: RunSpec, args):
    """The optimizer a method needs instead of the Trainer's default, or `None` (the Trainer builds AdamW)."""
    if (
        run.adapter is not None
        and run.adapter.type == "ALLORA"
        and run.adapter.kwargs.get("coefficient_on") == "update"
    ):
        import torch

        from regtune import create_allora_optimizer

        return create_allora_optimizer(
            model,
            torch.optim.AdamW,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
    return None


def build_trainer(
    run: RunSpec, model, args, train_dataset, eval_dataset, tokenizer, task: str, metrics: dict | None = None
):
    """
    Instantiate the run's trainer, its regularizers and (when a method needs one) its optimizer; `metrics`: the
    loaded `evaluate` modules of the run's metrics ([`load_metrics`]).
    """
    cls, _ = resolve_trainer(run.trainer)
    kwargs: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "processing_class": tokenizer,
    }
    if not takes_raw_data(run):
        kwargs["data_collator"] = data_collator(tokenizer, task)  # SFT trainers build their own
    if task == "sequence-classification" and run.evaluation.metrics:
        kwargs["compute_metrics"] = compute_classification_metrics(run.evaluation.metrics, metrics)
    optimizer = build_optimizer(model, run, args)
    if optimizer is not None:
        kwargs["optimizers"] = (optimizer, None)
    if run.regularizers:
        from regtune.regularizers import build_regularizer

        kwargs["regularizers"] = [build_regularizer(r.type, **r.kwargs) for r in run.regularizers]
        for column in dict.fromkeys(getattr(reg, "index_column", None) for reg in kwargs["regularizers"]):
            if column is not None and column not in train_dataset.column_names:  # ELR / PS-KD's per-example index
                from regtune.regularizers import add_sample_index

                kwargs["train_dataset"] = train_dataset = add_sample_index(train_dataset, column)
    elif _accepts(cls, "regularizers"):
        kwargs["regularizers"] = []
    return cls(**kwargs)


def _accepts(cls, name: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return name in params
