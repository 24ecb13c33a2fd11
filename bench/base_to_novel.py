"""Base-to-novel generalization on text: the analogue of the CoOp/CLIP base-to-novel protocol.

* Model: the offline all-MiniLM-L6-v2 (`AutoModel` + `AutoTokenizer`) used as a *dual encoder*. A text is embedded as
  the mean of its last hidden states over non-padding tokens, L2-normalized. A class is the embedding of a short
  natural-language description of it (`DESCRIPTIONS`). logits = SCALE * cosine(text, class), SCALE = 20 (fixed,
  not learned; 20 is the scale all-MiniLM-L6-v2 was trained with in sentence-transformers' contrastive loss).
  The same (adapted) encoder embeds the inputs and the class descriptions. During training the class embeddings are
  recomputed with the current model at every step (with gradient: the descriptions are a second, tiny batch through
  the same encoder); at evaluation they are computed once per evaluation with the adapted model.
* Data (/work/shared/data): TREC coarse labels (train_5500 pool, TREC_10 test), AG News (test.csv only: a fixed
  train pool of 100 examples per class is carved out with a fixed seed, the rest is the test set), SST-2 (train.tsv
  pool, dev.tsv test; 2 classes, so it has no base/novel split and is used for the zero-shot sanity check only).
* Split: the first half of the classes in the dataset's canonical label order is *base*, the second half *novel*
  (`SPLITS`): TREC base ABBR/ENTY/DESC, novel HUM/LOC/NUM; AG News base World/Sports, novel Business/Sci-Tech.
* Protocol per seed: k examples per base class are drawn from the pool (seeded); the model is trained on them with
  a classifier that only knows the base-class descriptions. Reported on the test set: *base* = accuracy of
  base-class examples classified among the base classes; *novel* = accuracy of novel-class examples classified
  among the novel classes; H = harmonic mean of base and novel; also *all* = accuracy of every test example
  classified among all classes (the "generalized" setting, not part of CoOp's protocol). Mean and std (population
  std, as `statistics.pstdev`) over seeds.
* Methods are pluggable (`register_method`): a method builds `(model, optimizer, step_fn, scheduler)` from the
  loaded encoder; `step_fn(ctx: StepContext) -> float` owns forward/backward/update, so two-pass methods (SAM, GLAD,
  R-AMT's two backward passes) plug in. Provided: `zero-shot` (no training) and `lora`.

Usage:
    python bench/base_to_novel.py --datasets trec ag_news --methods zero-shot lora --seeds 0 1 2 --k 16 --steps 50 \
        --out bench/out/base_to_novel
    python bench/base_to_novel.py --datasets trec sst2 ag_news --methods zero-shot --max-test-per-class 0 \
        --out bench/out/base_to_novel_zs_full            # zero-shot on the full test sets
    python bench/base_to_novel.py --datasets trec ag_news --methods lora --tune-lr 1e-4 3e-4 1e-3 3e-3 --seeds 0
                                                         # lr grid, scored on a base-class validation split only

Writes <out>/results.json and <out>/results.md (with --tune-lr: tune_lr.json / tune_lr.md) and prints the table.

Adding a method (in this file, or from another script after `sys.path.insert(0, "bench")`):

    from base_to_novel import MethodConfig, StepContext, TrainSetup, register_method

    @register_method("my-method", default_lr=1e-3)
    def build_my_method(model: torch.nn.Module, cfg: MethodConfig) -> TrainSetup | None:
        ...  # wrap/adapt `model`, build an optimizer with lr=cfg.lr; cfg.options holds --method-opt KEY=VALUE
        return TrainSetup(model, optimizer, step_fn=None)  # step_fn=None: loss.backward(); step; zero_grad
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# On shared, oversubscribed cores libgomp's default spin-waiting makes 2-thread steps ~5x slower than 1-thread ones
# (measured here: 4 s vs 0.8 s per LoRA step on TREC at load ~10); passive waiting removes that. It only takes effect
# if set before torch (OpenMP) is first imported, i.e. when this file is run as a script or imported first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import DATA_DIR, OUT_DIR, machine_description, minilm_dir, quiet_transformers  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402


SCALE = 20.0
MAX_LEN = 64
AG_NEWS_POOL_PER_CLASS = 100  # carved once from ag_news/test.csv with POOL_SEED; the rest is the test set
POOL_SEED = 0
DEFAULT_MAX_TEST_PER_CLASS = {"ag_news": 200}  # fixed subsample of the test set (CPU budget); 0 or None: all

# Canonical label order (TREC: the coarse-label order of the HF `trec` dataset; AG News: classes.txt order).
LABELS = {
    "trec": ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"],
    "ag_news": ["World", "Sports", "Business", "Sci/Tech"],
    "sst2": ["negative", "positive"],
}
DESCRIPTIONS = {
    "trec": {
        "ABBR": "a question asking for an abbreviation",
        "ENTY": "a question asking for an entity",
        "DESC": "a question asking for a description",
        "HUM": "a question asking for a person",
        "LOC": "a question asking for a location",
        "NUM": "a question asking for a number",
    },
    "ag_news": {
        "World": "a news article about world politics",
        "Sports": "a news article about sports",
        "Business": "a news article about business",
        "Sci/Tech": "a news article about science and technology",
    },
    "sst2": {
        "negative": "a movie review with negative sentiment",
        "positive": "a movie review with positive sentiment",
    },
}
# Base = first half of the canonical order, novel = second half (CoOp's convention). None: no base/novel split.
SPLITS = {
    "trec": (["ABBR", "ENTY", "DESC"], ["HUM", "LOC", "NUM"]),
    "ag_news": (["World", "Sports"], ["Business", "Sci/Tech"]),
    "sst2": None,
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


def _read_trec(path: str, labels: list[str]) -> list[tuple[str, int]]:
    out = []
    with open(path, encoding="latin-1") as f:  # train_5500.label is not valid UTF-8
        for line in f:
            line = line.strip()
            if line:
                out.append((line.split(" ", 1)[1], labels.index(line.split(":", 1)[0])))
    return out


def _read_sst2(path: str) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(sentence.strip(), int(label)) for sentence, label in rows]


def load_dataset(name: str, max_test_per_class: int | None = None, data_dir: str = DATA_DIR) -> TextDataset:
    """Load one dataset; `max_test_per_class` keeps a fixed (POOL_SEED) subsample of each class's test examples."""
    labels = LABELS[name]
    if name == "trec":
        pool = _read_trec(os.path.join(data_dir, "trec", "train_5500.label"), labels)
        test = _read_trec(os.path.join(data_dir, "trec", "TREC_10.label"), labels)
        note = "TREC_10.label"
    elif name == "sst2":
        pool = _read_sst2(os.path.join(data_dir, "sst2", "train.tsv"))
        test = _read_sst2(os.path.join(data_dir, "sst2", "dev.tsv"))
        note = "dev.tsv"
    elif name == "ag_news":
        with open(os.path.join(data_dir, "ag_news", "test.csv"), newline="") as f:
            rows = [
                (f"{title}. {desc}".replace("\\n", " ").replace("\\", " ").strip(), int(cls) - 1)
                for cls, title, desc in csv.reader(f)
            ]
        rng = random.Random(POOL_SEED)
        pool_ids = set()
        for c in range(len(labels)):
            ids = [i for i, (_, y) in enumerate(rows) if y == c]
            pool_ids.update(rng.sample(ids, AG_NEWS_POOL_PER_CLASS))
        pool = [rows[i] for i in sorted(pool_ids)]
        test = [row for i, row in enumerate(rows) if i not in pool_ids]
        note = f"test.csv minus a {AG_NEWS_POOL_PER_CLASS}/class train pool"
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if max_test_per_class:
        rng = random.Random(POOL_SEED)
        keep = []
        for c in range(len(labels)):
            ids = [i for i, (_, y) in enumerate(test) if y == c]
            keep += ids if len(ids) <= max_test_per_class else rng.sample(ids, max_test_per_class)
        test = [test[i] for i in sorted(keep)]
        note += f", fixed subsample of <= {max_test_per_class}/class"
    return TextDataset(name, labels, pool, test, note)


def sample_kshot(ds: TextDataset, classes: Sequence[int], k: int, seed: int, n_val: int = 0):
    """k training (and n_val validation) examples per class from the pool, disjoint, seeded.

    Labels are remapped to positions in `classes` (the classifier only knows those classes)."""
    rng = random.Random(seed)
    train, val = [], []
    for j, c in enumerate(classes):
        ids = [i for i, (_, y) in enumerate(ds.pool) if y == c]
        if len(ids) < k + n_val:
            raise ValueError(f"{ds.name}: class {ds.labels[c]} has {len(ids)} pool examples < k + n_val")
        ids = rng.sample(ids, k + n_val)
        train += [(ds.pool[i][0], j) for i in ids[:k]]
        val += [(ds.pool[i][0], j) for i in ids[k:]]
    return train, val


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


def embed(model: torch.nn.Module, enc: dict) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens), L2-normalized sentence embeddings."""
    hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


def cosine_logits(text_emb: torch.Tensor, class_emb: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    return scale * text_emb @ class_emb.T


@torch.inference_mode()
def embed_all(model: torch.nn.Module, texts: Sequence[str], batch_size: int = 64, max_len: int = MAX_LEN):
    """Embeddings of many texts, batched by length (less padding), returned in the input order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        out[ids] = embed(model, tokenize([texts[i] for i in ids], max_len)).float()
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


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


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
class StepContext:
    """Everything one training step needs. `logits()` runs the forward pass: the batch and the base-class
    descriptions through `model` (default: the model being trained), with gradient; `loss()` is the CE of it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict  # input_ids, attention_mask (tokenized inputs)
    labels: torch.Tensor  # indices into the base classes
    class_batch: dict  # tokenized base-class descriptions
    step: int
    total_steps: int
    scale: float = SCALE

    def logits(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        model = self.model if model is None else model
        return cosine_logits(embed(model, self.batch), embed(model, self.class_batch), self.scale)

    def loss(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(self.logits() if logits is None else logits, self.labels)


StepFn = Callable[[StepContext], float]


def default_step(ctx: StepContext) -> float:
    """One plain step: CE forward, loss.backward(), optimizer.step(), zero_grad. Returns the loss."""
    loss = ctx.loss()
    loss.backward()
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return loss.item()


@dataclass
class TrainSetup:
    """What a method builder returns. `step_fn` None: `default_step`. `scheduler`: stepped after every step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: StepFn | None = None
    scheduler: Any = None


MethodBuilder = Callable[[torch.nn.Module, MethodConfig], "TrainSetup | None"]


@dataclass
class MethodSpec:
    name: str
    build: MethodBuilder
    default_lr: float | None = None
    description: str = ""


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, default_lr: float | None = None, description: str = ""):
    """Decorator: `@register_method("name", default_lr=1e-3)` on `build(model, cfg: MethodConfig) -> TrainSetup | None`.

    `build` gets a freshly loaded encoder (an `AutoModel`, `BertModel`, in train mode, seeded with cfg.seed) and
    returns the model to train with its optimizer (and optional step function and scheduler), or None for a method
    that does not train (evaluated as is). `cfg.lr` is --lr, else the method's `default_lr`."""

    def deco(fn: MethodBuilder) -> MethodBuilder:
        METHODS[name] = MethodSpec(name, fn, default_lr, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


@register_method("zero-shot", description="no training: the pre-trained encoder")
def build_zero_shot(model: torch.nn.Module, cfg: MethodConfig) -> TrainSetup | None:
    return None


LORA_TARGETS = ["query", "key", "value"]


@register_method("lora", default_lr=3e-3, description="peft LoRA r=8, alpha=16, dropout 0.1 on query/key/value; AdamW")
def build_lora(model: torch.nn.Module, cfg: MethodConfig) -> TrainSetup:
    import peft

    opts = cfg.options
    config = peft.LoraConfig(
        r=int(opts.get("r", 8)),
        lora_alpha=float(opts.get("alpha", 16)),
        lora_dropout=float(opts.get("dropout", 0.1)),
        target_modules=LORA_TARGETS,
    )
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=float(opts.get("wd", 0.0))
    )
    return TrainSetup(model, optimizer, scheduler=cosine_schedule(optimizer, cfg.steps))


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int):
    """Cosine decay from the base lr to 0 over `steps` steps, no warm-up (CoOp's schedule, without its warm-up)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )


# ----------------------------------------------------------------------------------------------------- training
def _batches(train: list[tuple[str, int]], batch_size: int, seed: int):
    """Endless stream of batches: reshuffled every epoch (seeded); a batch may straddle two epochs."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            perm = list(range(len(train)))
            rng.shuffle(perm)
            order += perm
        ids, order = order[:batch_size], order[batch_size:]
        yield tokenize([train[i][0] for i in ids]), torch.tensor([train[i][1] for i in ids])


def build_method(
    method: str, ds: TextDataset, *, lr=None, steps=50, batch_size=16, seed=0, options=None
) -> tuple[TrainSetup | None, MethodConfig]:
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
    model = load_encoder()
    model.train()
    setup = spec.build(model, cfg)
    if setup is None:
        model.eval()
        return TrainSetup(model, None), cfg
    return setup, cfg


def train(setup: TrainSetup, train_set, class_ids: Sequence[int], ds: TextDataset, cfg: MethodConfig) -> list[float]:
    """Train `setup` for cfg.steps steps on `train_set` (labels: indices into `class_ids`). Returns the losses."""
    class_batch = tokenize([ds.descriptions[c] for c in class_ids])
    step_fn = setup.step_fn or default_step
    batches = _batches(train_set, cfg.batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    setup.model.train()
    losses = []
    for step in range(cfg.steps):
        batch, labels = next(batches)
        ctx = StepContext(setup.model, setup.optimizer, batch, labels, class_batch, step, cfg.steps)
        losses.append(float(step_fn(ctx)))
        if setup.scheduler is not None:
            setup.scheduler.step()
    setup.model.eval()
    return losses


def run_one(method: str, ds: TextDataset, *, k: int, seed: int, steps: int, batch_size: int, lr=None, options=None):
    """One (method, seed) base-to-novel run: train on k-shot base classes, evaluate base / novel / H / all."""
    t0 = time.perf_counter()
    setup, cfg = build_method(method, ds, lr=lr, steps=steps, batch_size=batch_size, seed=seed, options=options)
    losses = []
    if setup.optimizer is not None:
        base, _ = ds.split
        train_set, _ = sample_kshot(ds, base, k, seed)
        losses = train(setup, train_set, base, ds, cfg)
    t1 = time.perf_counter()
    res = evaluate(setup.model, ds)
    res.update(
        seed=seed,
        lr=cfg.lr if setup.optimizer is not None else None,
        train_s=t1 - t0,
        eval_s=time.perf_counter() - t1,
        losses=losses,
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
    """Median training-step time of several methods measured side by side in one process.

    All methods are built (same seed, same data) and stepped *interleaved*: each round runs one step of every
    method, in an order rotated round to round, so that load on shared cores hits all alike; `warmup` rounds are
    discarded. Returns {method: {"median_s", "times_s", "ratio"}}; "ratio" is the median over rounds of the paired
    ratio t(method) / t(methods[0]). `options`: {method: {KEY: VALUE}}. Methods that do not train are skipped."""
    base, _ = ds.split
    train_set, _ = sample_kshot(ds, base, k, seed)
    class_batch = tokenize([ds.descriptions[c] for c in base])
    state = {}
    for m in methods:
        setup, cfg = build_method(
            m, ds, lr=(lrs or {}).get(m), steps=warmup + n_steps, batch_size=batch_size, seed=seed,
            options=(options or {}).get(m),
        )  # fmt: skip
        if setup.optimizer is None:
            continue
        setup.model.train()
        state[m] = (setup, _batches(train_set, batch_size, seed))
    names = list(state)
    times = {m: [] for m in names}
    for rnd in range(warmup + n_steps):
        shift = rnd % len(names)
        for m in names[shift:] + names[:shift]:
            setup, batches = state[m]
            batch, labels = next(batches)
            ctx = StepContext(setup.model, setup.optimizer, batch, labels, class_batch, rnd, warmup + n_steps)
            t0 = time.perf_counter()
            (setup.step_fn or default_step)(ctx)
            if setup.scheduler is not None:
                setup.scheduler.step()
            if rnd >= warmup:
                times[m].append(time.perf_counter() - t0)
    ref = times[names[0]] if names else []
    return {
        m: {
            "median_s": statistics.median(times[m]),
            "times_s": times[m],
            "ratio": statistics.median(a / b for a, b in zip(times[m], ref)),
        }
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
            setup, cfg = build_method(
                method, ds, lr=lr, steps=steps, batch_size=batch_size, seed=seed, options=options
            )
            train_set, val = sample_kshot(ds, base, k, seed, n_val=n_val)
            losses = train(setup, train_set, base, ds, cfg)
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
                "final_train_loss": losses[-1],
            }
        )
        print(f"  {ds.name} {method} lr={lr:g}: val acc {accs}, val loss {v_losses}", flush=True)
    best = max(rows, key=lambda r: (round(r["mean"], 6), -r["mean_loss"]))
    return {"rows": rows, "best_lr": best["lr"]}


# ------------------------------------------------------------------------------------------------------ output
def _ms(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


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
        cells = [_ms([r.get(key, float("nan")) for r in runs]) for key in ("base", "novel", "H", "all")]
        lines.append(f"| {row['dataset']} | {row['method']} | {lr} | " + " | ".join(cells) + f" | {n} |")
    if not result["rows"]:
        lines = lines[:1]
    if result.get("step_times"):
        lines += [
            "",
            f"Training-step time (batch {cfg['batch_size']}; median over {cfg['time_steps']} interleaved steps after "
            f"3 warm-up steps; ratio: median of paired per-round ratios to the first timed method):",
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
    p.add_argument("--time-steps", type=int, default=0, help="also measure median step time over N interleaved steps")
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
                if ds.split is None:  # zero-shot all-way only
                    t0 = time.perf_counter()
                    model = load_encoder().eval()
                    res = evaluate(model, ds) | {"seed": seed, "lr": None, "train_s": 0.0}
                    res["eval_s"] = time.perf_counter() - t0
                else:
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
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
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
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
