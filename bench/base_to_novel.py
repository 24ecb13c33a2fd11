"""Base-to-novel generalization on text: the analogue of the CoOp/CLIP base-to-novel protocol.

* Model: the offline all-MiniLM-L6-v2 (`AutoModel` + `AutoTokenizer`) used as a *dual encoder*
  ([`DualEncoderClassifier`]). A text is embedded as the mean of its last hidden states over non-padding tokens,
  L2-normalized. A class is the embedding of a short natural-language description of it (`DESCRIPTIONS`).
  logits = SCALE * cosine(text, class), SCALE = 20 (fixed, not learned; 20 is the scale all-MiniLM-L6-v2 was trained
  with in sentence-transformers' contrastive loss). The same (adapted) encoder embeds the inputs and the class
  descriptions. During training the class embeddings are recomputed by every forward pass (with gradient: the
  descriptions are a second, tiny batch through the same encoder); at evaluation they are computed once per
  evaluation with the adapted model.
* Data (../shared/data, read by `regtune.data.fewshot_text`, the recipes' `base-to-novel` task): TREC coarse labels (train_5500 pool, TREC_10 test), AG News
  (test.csv only: a fixed train pool of 100 examples per class is carved out with a fixed seed, the rest is the test
  set), SST-2 (train.tsv pool, dev.tsv test; 2 classes, so it has no base/novel split and is used for the zero-shot
  sanity check only).
* Split: the first half of the classes in the dataset's canonical label order is *base*, the second half *novel*
  (`SPLITS`): TREC base ABBR/ENTY/DESC, novel HUM/LOC/NUM; AG News base World/Sports, novel Business/Sci-Tech.
* Protocol per seed: k examples per base class are drawn from the pool (seeded); the model is trained on them with
  a classifier that only knows the base-class descriptions. Reported on the test set: *base* = accuracy of
  base-class examples classified among the base classes; *novel* = accuracy of novel-class examples classified
  among the novel classes; H = harmonic mean of base and novel; also *all* = accuracy of every test example
  classified among all classes (the "generalized" setting, not part of CoOp's protocol). Mean and std (population
  std, as `statistics.pstdev`) over seeds.
* Training runs the shipped trainers: a method builds a [`TrainSetup`] (the model to train, a regtune trainer class,
  its extra `TrainingArguments` fields and regularizers) and the harness runs `trainer.train()` with the shared
  settings (AdamW, cosine decay to 0 without warm-up, batch `--batch-size`, `--steps` optimizer steps, no gradient
  clipping, seed = the run's seed). The mechanism's diagnostics the trainers log (e.g. `glad/cos_g_gsam`,
  `gradient_dropout/drop_fraction`, `mask_tuning/flipped`) are kept per run (mean over the logged steps).

Methods: `zero-shot` (no training), `lora` (peft LoRA, `RegTrainer`), `glad-l<lambda>-r<rho>` (`GLADTrainer` on the
same LoRA model), `mask`, `mask-gd0.3`, `mask-gd1.0` (`MaskTuningTrainer`: R-AMT masks on the attention
projections, gradient dropout lambda 0 / 0.3 / 1.0).

Usage (from the repository root):
    python -m bench.base_to_novel --datasets trec ag_news --methods zero-shot lora --seeds 0 1 2 --k 16 --steps 50 \
        --out bench/out/base_to_novel
    python -m bench.base_to_novel --datasets trec sst2 ag_news --methods zero-shot --max-test-per-class 0 \
        --out bench/out/base_to_novel_zs_full            # zero-shot on the full test sets
    python -m bench.base_to_novel --datasets trec ag_news --methods lora --tune-lr 1e-4 3e-4 1e-3 3e-3 --seeds 0
                                                         # lr grid, scored on a base-class validation split only

Writes <out>/results.json and <out>/results.md (with --tune-lr: tune_lr.json / tune_lr.md) and prints the table.

Adding a method (in this file, or from another module that is then run with `main()`):

    from bench.base_to_novel import MethodConfig, TrainSetup, build_lora, register_method

    @register_method("my-method", default_lr=3e-3)
    def build_my_method(model: DualEncoderClassifier, cfg: MethodConfig) -> TrainSetup | None:
        setup = build_lora(model, cfg)  # or wrap `model` with another peft config
        setup.regularizers.append(MyRegularizer())  # a regtune.Regularizer (loss term, forward context, own step)
        return setup
"""

from __future__ import annotations

import os


# On shared, oversubscribed cores libgomp's default spin-waiting makes 2-thread steps ~5x slower than 1-thread ones
# (measured here: 4 s vs 0.8 s per LoRA step on TREC at load ~10); passive waiting removes that. It only takes effect
# if set before torch (OpenMP) is first imported, i.e. when this module is run or imported first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModel, AutoTokenizer, PrinterCallback, TrainerCallback, TrainingArguments  # noqa: E402

import regtune  # noqa: E402
from bench._common import OUT_DIR, machine_description, minilm_dir, quiet_transformers  # noqa: E402
from bench.data import DATA_DIR  # noqa: E402
from bench.results import fmt_mean_std, write_results  # noqa: E402
from regtune.data import fewshot_text  # noqa: E402
from regtune.data.dual_encoder import DEFAULT_SCALE as SCALE  # noqa: E402
from regtune.data.dual_encoder import DualEncoderClassifier, cosine_logits, mean_pool  # noqa: E402, F401
from regtune.data.fewshot_text import AG_NEWS_POOL_PER_CLASS, DESCRIPTIONS, POOL_SEED, harmonic_mean  # noqa: E402


MAX_LEN = 64
DEFAULT_MAX_TEST_PER_CLASS = {"ag_news": 200}  # fixed subsample of the test set (CPU budget); 0 or None: all

# The data sets, their label orders, class descriptions and readers are regtune's (`regtune.data.fewshot_text`, the
# `base-to-novel` / `few-shot` built-in tasks of recipes). Base = first half of the label order, novel = the rest.
LABELS = {name: fewshot_text.LABELS[name] for name in ("trec", "ag_news", "sst2")}
SPLITS = {
    name: (labels[: len(labels) // 2], labels[len(labels) // 2 :]) if len(labels) > 2 else None
    for name, labels in LABELS.items()
}
DATASETS = tuple(LABELS)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft + tf 5


# --------------------------------------------------------------------------------------------------------- data
@dataclass
class TextDataset:
    name: str
    labels: list[str]  # canonical order; example labels are indices into it
    pool: list[tuple[str, int]]  # training pool (k-shot and validation examples are drawn from it)
    test: list[tuple[str, int]]
    test_note: str = ""

    @property
    def descriptions(self) -> list[str]:
        return [DESCRIPTIONS[self.name][label] for label in self.labels]

    @property
    def split(self) -> tuple[list[int], list[int]] | None:
        if SPLITS[self.name] is None:
            return None
        base, novel = SPLITS[self.name]
        return [self.labels.index(c) for c in base], [self.labels.index(c) for c in novel]


def load_dataset(name: str, max_test_per_class: int | None = None, data_dir: str = DATA_DIR) -> TextDataset:
    """Load one dataset; `max_test_per_class` keeps a fixed (POOL_SEED) subsample of each class's test examples."""
    if name not in LABELS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    pool, test = fewshot_text.load_pool_and_test(name, data_dir, max_test_per_class)
    note = {
        "trec": "TREC_10.label",
        "sst2": "dev.tsv",
        "ag_news": f"test.csv minus a {AG_NEWS_POOL_PER_CLASS}/class train pool (seed {POOL_SEED})",
    }[name]
    if max_test_per_class:
        note += f", fixed subsample of <= {max_test_per_class}/class"
    return TextDataset(name, LABELS[name], pool, test, note)


def sample_kshot(ds: TextDataset, classes: Sequence[int], k: int, seed: int, n_val: int = 0):
    """k training (and n_val validation) examples per class from the pool, disjoint, seeded
    ([`regtune.data.fewshot_text.sample_shots`]: the shots do not depend on n_val).

    Labels are remapped to positions in `classes` (the classifier only knows those classes)."""
    train, val = fewshot_text.sample_shots(ds.pool, classes, k, seed, n_val)
    position = {c: j for j, c in enumerate(classes)}
    return [(t, position[y]) for t, y in train], [(t, position[y]) for t, y in val]


# -------------------------------------------------------------------------------------------------------- model
_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = AutoTokenizer.from_pretrained(minilm_dir())
    return _TOKENIZER


def load_encoder() -> torch.nn.Module:
    """A fresh all-MiniLM-L6-v2 `BertModel` (no pooler head is used)."""
    quiet_transformers()
    return AutoModel.from_pretrained(minilm_dir(), add_pooling_layer=False)


def tokenize(texts: Sequence[str], max_len: int = MAX_LEN) -> dict:
    return dict(tokenizer()(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"))


def classifier(model: torch.nn.Module) -> DualEncoderClassifier:
    """The [`DualEncoderClassifier`] inside `model` (a peft model wrapping one, or one itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.inference_mode()
def embed_all(model: torch.nn.Module, texts: Sequence[str], batch_size: int = 64, max_len: int = MAX_LEN):
    """Embeddings of many texts, batched by length (less padding), returned in the input order."""
    clf = classifier(model)
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), clf.config.hidden_size)
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        enc = tokenize([texts[i] for i in ids], max_len)
        out[ids] = clf.embed(enc["input_ids"], enc["attention_mask"]).float()
    model.train(was_training)
    return out


def _acc(text_emb, class_emb, labels, classes: Sequence[int]) -> tuple[float, int]:
    """Accuracy of the examples whose label is in `classes`, classified among `classes` only."""
    sel = torch.tensor([y in classes for y in labels])
    if not sel.any():
        return float("nan"), 0
    target = torch.tensor([list(classes).index(y) for y in labels if y in classes])
    pred = (text_emb[sel] @ class_emb[list(classes)].T).argmax(1)
    return (pred == target).float().mean().item(), int(sel.sum())


def evaluate(model: torch.nn.Module, ds: TextDataset, max_len: int = MAX_LEN) -> dict:
    """base / novel / H / all accuracies on the test set; class embeddings from `model` (computed once here)."""
    text_emb = embed_all(model, [t for t, _ in ds.test], max_len=max_len)
    class_emb = embed_all(model, ds.descriptions, max_len=max_len)
    labels = [y for _, y in ds.test]
    res = {}
    res["all"], res["n_all"] = _acc(text_emb, class_emb, labels, range(len(ds.labels)))
    if ds.split is not None:
        base, novel = ds.split
        res["base"], res["n_base"] = _acc(text_emb, class_emb, labels, base)
        res["novel"], res["n_novel"] = _acc(text_emb, class_emb, labels, novel)
        res["H"] = harmonic_mean(res["base"], res["novel"])
    return res


# ------------------------------------------------------------------------------------------------- method API
@dataclass
class MethodConfig:
    """What a method builder gets besides the model. `options`: --method-opt KEY=VALUE (values parsed as float
    when possible, else str)."""

    lr: float | None
    steps: int
    batch_size: int
    seed: int
    dataset: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainSetup:
    """
    What a method builder returns: the model to train (usually a peft model wrapping the classifier), the trainer
    class (`regtune.RegTrainer`, `regtune.GLADTrainer`, `regtune.MaskTuningTrainer`, ...), extra fields of its config
    class (`trainer_class.config_class`, else `TrainingArguments`; e.g. `{"glad_lambda": 0.5}`) on top of the
    harness's shared ones, and regularizers added with `regularizers=[...]`.
    """

    model: torch.nn.Module
    trainer_class: type = regtune.RegTrainer
    args: dict[str, Any] = field(default_factory=dict)
    regularizers: list = field(default_factory=list)


MethodBuilder = Callable[[DualEncoderClassifier, MethodConfig], "TrainSetup | None"]


@dataclass
class MethodSpec:
    name: str
    build: MethodBuilder
    default_lr: float | None = None
    description: str = ""


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, default_lr: float | None = None, description: str = ""):
    """Decorator: `@register_method("name", default_lr=1e-3)` on `build(model, cfg: MethodConfig) -> TrainSetup | None`.

    `build` gets a fresh [`DualEncoderClassifier`] over the base-class descriptions (in train mode, seeded with
    cfg.seed) and returns what to train, or None for a method that does not train (evaluated as is). `cfg.lr` is
    --lr, else the method's `default_lr`."""

    def deco(fn: MethodBuilder) -> MethodBuilder:
        METHODS[name] = MethodSpec(name, fn, default_lr, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


@register_method("zero-shot", description="no training: the pre-trained encoder")
def build_zero_shot(model: DualEncoderClassifier, cfg: MethodConfig) -> TrainSetup | None:
    return None


LORA_TARGETS = ["query", "key", "value"]


@register_method("lora", default_lr=3e-3, description="peft LoRA r=8, alpha=16, dropout 0.1 on query/key/value; AdamW")
def build_lora(model: DualEncoderClassifier, cfg: MethodConfig) -> TrainSetup:
    import peft

    opts = cfg.options
    config = peft.LoraConfig(
        r=int(opts.get("r", 8)),
        lora_alpha=float(opts.get("alpha", 16)),
        lora_dropout=float(opts.get("dropout", 0.1)),
        target_modules=LORA_TARGETS,
    )
    return TrainSetup(peft.get_peft_model(model, config), args={"weight_decay": float(opts.get("wd", 0.0))})


def _glad_builder(glad_lambda: float, rho: float):
    def build(model: DualEncoderClassifier, cfg: MethodConfig) -> TrainSetup:
        setup = build_lora(model, cfg)  # the same adapter, optimizer, lr and schedule as `lora`
        setup.trainer_class = regtune.GLADTrainer
        share = str(cfg.options.get("share_dropout_masks", "true")).lower() in ("1", "1.0", "true")
        setup.args.update(glad_lambda=glad_lambda, glad_rho=rho, glad_share_dropout_masks=share)
        return setup

    return build


for _lam in (0.5, 1.0):
    for _rho in (0.05, 0.2):
        register_method(
            f"glad-l{_lam}-r{_rho}",
            default_lr=3e-3,
            description=f"GLADTrainer on the `lora` model: SAM-referenced gradient, lambda {_lam}, rho {_rho}",
        )(_glad_builder(_lam, _rho))


MASK_TARGETS = r".*encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)$"
MASK_LR = 3e-4  # tuned on base-class validation data (grid 1e-4 .. 1e-2): see docs/mask_tuning.md


def _mask_builder(graddrop_lambda: float):
    def build(model: DualEncoderClassifier, cfg: MethodConfig) -> TrainSetup:
        import peft

        config = regtune.MaskTuningConfig(target_modules=MASK_TARGETS, graddrop_lambda=graddrop_lambda)
        args = {"graddrop_lambda": graddrop_lambda, "mask_flips_per_layer": False}
        if "score_l2_weight" in cfg.options:
            args["score_l2_weight"] = float(cfg.options["score_l2_weight"])
        return TrainSetup(peft.get_peft_model(model, config), regtune.MaskTuningTrainer, args)

    return build


for _lam, _what in ((0.0, "no gradient dropout"), (0.3, "gradient dropout lambda 0.3"), (1.0, "gradient dropout 1.0")):
    register_method(
        "mask" if _lam == 0.0 else f"mask-gd{_lam}",
        default_lr=MASK_LR,
        description=f"MaskTuningTrainer: R-AMT masks on attention, score penalty, {_what}",
    )(_mask_builder(_lam))


# ----------------------------------------------------------------------------------------------------- training
class _StepClock(TrainerCallback):
    """Wall time of every optimizer step (from `on_step_begin` to `on_step_end`)."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def _as_dataset(examples: list[tuple[str, int]]):
    from datasets import Dataset

    enc = tokenizer()([t for t, _ in examples], truncation=True, max_length=MAX_LEN)
    return Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": [y for _, y in examples]}
    )


def build_method(
    method: str, ds: TextDataset, class_ids: Sequence[int], *, lr=None, steps=50, batch_size=16, seed=0, options=None
) -> tuple[TrainSetup | None, MethodConfig, DualEncoderClassifier]:
    """Seed, load a fresh classifier over `class_ids`' descriptions and build `method` on it."""
    spec = METHODS[method]
    cfg = MethodConfig(
        lr=spec.default_lr if lr is None else lr,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        dataset=ds.name,
        options=dict(options or {}),
    )
    torch.manual_seed(seed)
    model = DualEncoderClassifier(load_encoder(), tokenize([ds.descriptions[c] for c in class_ids]))
    model.train()
    return spec.build(model, cfg), cfg, model


def train(setup: TrainSetup, train_set, cfg: MethodConfig, output_dir: str, clock: _StepClock | None = None) -> dict:
    """
    Train `setup` for cfg.steps optimizer steps on `train_set` (labels: indices into the classifier's classes) with
    its trainer. Returns `{"losses": [...], "diagnostics": {name: mean over the logged steps}}`.
    """
    from transformers import DataCollatorWithPadding

    config_class = getattr(setup.trainer_class, "config_class", None) or TrainingArguments
    shared = dict(
        output_dir=output_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping (as the method papers' few-shot recipes)
        optim="adamw_torch",
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    args = config_class(**{**shared, **setup.args})
    trainer = setup.trainer_class(
        model=setup.model,
        args=args,
        train_dataset=_as_dataset(train_set),
        data_collator=DataCollatorWithPadding(tokenizer()),
        regularizers=list(setup.regularizers),
        callbacks=[clock] if clock is not None else None,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    setup.model.eval()
    history = trainer.state.log_history
    diagnostics: dict[str, list[float]] = {}
    for entry in history:
        for key, value in entry.items():
            if "/" in key and isinstance(value, (int, float)):
                diagnostics.setdefault(key, []).append(float(value))
    return {
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "diagnostics": {key: statistics.fmean(values) for key, values in diagnostics.items()},
    }


def run_one(method: str, ds: TextDataset, *, k: int, seed: int, steps: int, batch_size: int, lr=None, options=None):
    """One (method, seed) base-to-novel run: train on k-shot base classes, evaluate base / novel / H / all."""
    t0 = time.perf_counter()
    base, _ = ds.split if ds.split is not None else (range(len(ds.labels)), None)
    setup, cfg, model = build_method(
        method, ds, base, lr=lr, steps=steps, batch_size=batch_size, seed=seed, options=options
    )
    trained = {"losses": [], "diagnostics": {}}
    if setup is not None:
        train_set, _ = sample_kshot(ds, base, k, seed)
        with tempfile.TemporaryDirectory() as tmp:
            trained = train(setup, train_set, cfg, tmp)
        model = setup.model
    model.eval()
    t1 = time.perf_counter()
    res = evaluate(model, ds)
    res.update(
        seed=seed,
        lr=cfg.lr if setup is not None else None,
        train_s=t1 - t0,
        eval_s=time.perf_counter() - t1,
        **trained,
    )
    return res


# ------------------------------------------------------------------------------------------------ step timing
def measure_step_times(
    methods: Sequence[str],
    ds: TextDataset,
    *,
    n_steps: int = 20,
    warmup: int = 3,
    k: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    lrs: dict | None = None,
    options: dict | None = None,
) -> dict:
    """Median optimizer-step time of several methods, each trained by its own trainer for `warmup + n_steps` steps
    (same seed, same data), one method after the other; the first `warmup` steps are discarded. Returns
    {method: {"median_s", "times_s", "ratio"}}; "ratio" is median(method) / median(methods[0]). `options`:
    {method: {KEY: VALUE}}. Methods that do not train are skipped."""
    base, _ = ds.split
    train_set, _ = sample_kshot(ds, base, k, seed)
    times = {}
    for m in methods:
        setup, cfg, _ = build_method(
            m, ds, base, lr=(lrs or {}).get(m), steps=warmup + n_steps, batch_size=batch_size, seed=seed,
            options=(options or {}).get(m),
        )  # fmt: skip
        if setup is None:
            continue
        clock = _StepClock()
        with tempfile.TemporaryDirectory() as tmp:
            train(setup, train_set, cfg, tmp, clock=clock)
        times[m] = clock.times[warmup:]
    names = list(times)
    ref = statistics.median(times[names[0]]) if names else 1.0
    return {
        m: {"median_s": statistics.median(times[m]), "times_s": times[m], "ratio": statistics.median(times[m]) / ref}
        for m in names
    }


# --------------------------------------------------------------------------------------------------- lr tuning
def tune_lr(method: str, ds: TextDataset, lrs, *, k, seeds, steps, batch_size, n_val=32, options=None) -> dict:
    """Score each lr by base-class *validation* accuracy (n_val per base class, drawn from the train pool, disjoint
    from the k shots); no test or novel-class data is used. Best: highest mean accuracy, ties broken by the lower mean
    validation CE (at the training scale)."""
    base, _ = ds.split
    rows = []
    for lr in lrs:
        accs, v_losses = [], []
        for seed in seeds:
            setup, cfg, _ = build_method(
                method, ds, base, lr=lr, steps=steps, batch_size=batch_size, seed=seed, options=options
            )
            train_set, val = sample_kshot(ds, base, k, seed, n_val=n_val)
            with tempfile.TemporaryDirectory() as tmp:
                losses = train(setup, train_set, cfg, tmp)["losses"]
            v_emb = embed_all(setup.model, [t for t, _ in val])
            c_emb = embed_all(setup.model, [ds.descriptions[c] for c in base])
            v_y = [y for _, y in val]
            accs.append(_acc(v_emb, c_emb, v_y, range(len(base)))[0])
            v_losses.append(F.cross_entropy(cosine_logits(v_emb, c_emb), torch.tensor(v_y)).item())
        rows.append(
            {
                "lr": lr,
                "val_acc": accs,
                "val_loss": v_losses,
                "mean": statistics.mean(accs),
                "mean_loss": statistics.mean(v_losses),
                "final_train_loss": losses[-1] if losses else float("nan"),
            }
        )
        print(f"  {ds.name} {method} lr={lr:g}: val acc {accs}, val loss {v_losses}", flush=True)
    best = max(rows, key=lambda r: (round(r["mean"], 6), -r["mean_loss"]))
    return {"rows": rows, "best_lr": best["lr"]}


# ------------------------------------------------------------------------------------------------------ output
def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Base-to-novel, all-MiniLM-L6-v2 dual encoder, scale {cfg['scale']:g}, k={cfg['k']}, {cfg['steps']} steps, "
        f"batch {cfg['batch_size']}, max_len {cfg['max_len']}, seeds {cfg['seeds']}; mean ± std over seeds.",
        "",
        "| dataset | method | lr | base | novel | H | all (N-way) | n test (base / novel / all) |",
        "| --- | --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        runs = row["runs"]
        lr = f"{runs[0]['lr']:g}" if runs[0]["lr"] is not None else "–"
        r0 = runs[0]
        n = f"{r0.get('n_base', '–')} / {r0.get('n_novel', '–')} / {r0['n_all']}"
        cells = [fmt_mean_std([r.get(key, float("nan")) for r in runs]) for key in ("base", "novel", "H", "all")]
        lines.append(f"| {row['dataset']} | {row['method']} | {lr} | " + " | ".join(cells) + f" | {n} |")
    if not result["rows"]:
        lines = lines[:1]
    diag_rows = []
    for row in result["rows"]:
        keys = sorted({key for r in row["runs"] for key in r.get("diagnostics", {})})
        for key in keys:
            diag_rows.append(
                f"| {row['dataset']} | {row['method']} | `{key}` | "
                + fmt_mean_std([r.get("diagnostics", {}).get(key, float("nan")) for r in row["runs"]], 4)
                + " |"
            )
    if diag_rows:
        lines += [
            "",
            "The mechanism's diagnostics, as the trainers logged them (mean over the training steps; mean ± std over "
            "seeds):",
            "",
            "| dataset | method | diagnostic | value |",
            "| --- | --- | --- | ---: |",
            *diag_rows,
        ]
    if result.get("step_times"):
        lines += [
            "",
            f"Training-step time (batch {cfg['batch_size']}; median over {cfg['time_steps']} optimizer steps of each "
            f"method's trainer after 3 warm-up steps; ratio: to the first timed method's median):",
            "",
            "| dataset | method | median step (ms) | ratio |",
            "| --- | --- | ---: | ---: |",
        ]
        for name, timing in result["step_times"].items():
            first = next(iter(timing), "")
            for m, t in timing.items():
                lines.append(f"| {name} | {m} | {1000 * t['median_s']:.0f} | {t['ratio']:.3f} (vs {first}) |")
    lines += ["", f"Wall time {result['wall_s']:.0f} s; {result['machine']['date']}, {result['machine']['cpu']}."]
    return "\n".join(lines) + "\n"


def _parse_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """--method-opt lora:r=16 or r=16 (for every method)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        target, _, kv = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("*", "", item)
        key, value = kv.split("=", 1)
        try:
            value = float(value)
        except ValueError:
            pass
        out.setdefault(target, {})[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["trec", "ag_news"], choices=DATASETS)
    p.add_argument("--methods", nargs="+", default=["zero-shot", "lora"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--k", type=int, default=16, help="shots per base class")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="override every training method's default lr")
    p.add_argument(
        "--max-test-per-class", type=int, default=None,
        help="fixed test subsample per class; default: ag_news 200, others all; 0: all",
    )  # fmt: skip
    p.add_argument("--method-opt", nargs="*", default=None, help="[method:]KEY=VALUE, passed in MethodConfig.options")
    p.add_argument("--tune-lr", nargs="+", type=float, default=None, help="lr grid: tune on base-class val, no test")
    p.add_argument("--time-steps", type=int, default=0, help="also measure median step time over N steps")
    p.add_argument("--time-only", action="store_true", help="with --time-steps: skip the accuracy runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(OUT_DIR, "base_to_novel"))
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {list(METHODS)}")
    options = _parse_options(args.method_opt)
    opts = lambda m: {**options.get("*", {}), **options.get(m, {})}  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    result = {
        "bench": "base_to_novel",
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"scale": SCALE, "max_len": MAX_LEN},
        "machine": machine_description("cpu"),
        "descriptions": DESCRIPTIONS,
        "splits": SPLITS,
        "rows": [],
    }
    for name in args.datasets:
        mtpc = args.max_test_per_class if args.max_test_per_class is not None else DEFAULT_MAX_TEST_PER_CLASS.get(name)
        ds = load_dataset(name, mtpc or None)
        print(f"{name}: pool {len(ds.pool)}, test {len(ds.test)} ({ds.test_note})", flush=True)
        for method in [] if args.time_only else args.methods:
            if args.tune_lr:
                if ds.split is None or METHODS[method].default_lr is None:
                    continue
                tuned = tune_lr(
                    method, ds, args.tune_lr, k=args.k, seeds=args.seeds, steps=args.steps,
                    batch_size=args.batch_size, options=opts(method),
                )  # fmt: skip
                result["rows"].append({"dataset": name, "method": method, **tuned})
                continue
            if ds.split is None and method != "zero-shot":
                print(f"  {name}: no base/novel split, skipping {method}")
                continue
            runs = []
            seeds = args.seeds if method != "zero-shot" else args.seeds[:1]  # zero-shot is deterministic
            for seed in seeds:
                res = run_one(
                    method, ds, k=args.k, seed=seed, steps=args.steps, batch_size=args.batch_size,
                    lr=args.lr, options=opts(method),
                )  # fmt: skip
                runs.append(res)
                shown = {k: round(v, 4) for k, v in res.items() if k in ("base", "novel", "H", "all")}
                print(
                    f"  {name} {method} seed {seed}: {shown} ({res['train_s']:.0f}+{res['eval_s']:.0f} s)", flush=True
                )
            if method == "zero-shot":  # same numbers for every seed: evaluated once
                runs = [dict(runs[0], seed=s) for s in args.seeds]
            result["rows"].append({"dataset": name, "method": method, "runs": runs})
        if args.time_steps and ds.split is not None:
            timing = measure_step_times(
                args.methods, ds, n_steps=args.time_steps, k=args.k, batch_size=args.batch_size,
                options={m: opts(m) for m in args.methods},
            )  # fmt: skip
            result.setdefault("step_times", {})[name] = timing
            for m, t in timing.items():
                print(f"  {name} {m}: median step {1000 * t['median_s']:.0f} ms, ratio {t['ratio']:.3f}", flush=True)
    result["wall_s"] = time.time() - start
    stem = os.path.join(args.out, "tune_lr" if args.tune_lr else "results")
    if args.tune_lr:
        lines = [
            "| dataset | method | lr | val acc (mean) | val CE (mean) | acc per seed |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for row in result["rows"]:
            for r in row["rows"]:
                star = " (best)" if r["lr"] == row["best_lr"] else ""
                accs = ", ".join(f"{a:.3f}" for a in r["val_acc"])
                lines.append(
                    f"| {row['dataset']} | {row['method']} | {r['lr']:g}{star} | {r['mean']:.4f} "
                    f"| {r['mean_loss']:.4f} | {accs} |"
                )
        table = "\n".join(lines) + f"\n\nWall time {result['wall_s']:.0f} s.\n"
    else:
        table = markdown(result)
    write_results(stem, result, table)
    print(f"({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
