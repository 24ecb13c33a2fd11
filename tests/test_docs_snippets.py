"""Every ```python snippet of README.md and docs/*.md runs as written, on CPU, offline.

The snippets of one page run in order in one namespace (later snippets use what earlier ones defined, as a reader
would), in a temporary working directory where `recipes/`, `bench/` and `../shared/` point to the repository's.
Stand-ins for what a snippet names but does not build (see `_standins`; fresh before every snippet): `base` /
`model` (a tiny BERT classifier), `allora_model`, data sets `train` / `dev` / `train_ds` / `eval_ds` / `ds` (token
ids and labels for it; `ds` is a prompt/completion SFT set on the LfU pages), `args`; the Hub model ids in `HUB_IDS`
are replaced by a tiny Llama saved with a tokenizer. A page's snippets must finish within `PAGE_SECONDS`.

A snippet that is only a fragment may be skipped with a marker on the line before its fence, with a reason:
`<!-- no-run: reason -->`. Use it sparingly: a snippet that a user cannot run as written is a bug in the docs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import textwrap
import time
import traceback

import datasets
import pytest
import torch
from tiny_models import VOCAB, tiny_bert, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
NO_RUN = re.compile(r"^<!--\s*no-run:\s*(\S.*?)\s*-->$")
# Hub ids the docs name, replaced by the tiny causal LM (weights and tokenizer) saved by the `hub_standins` fixture
HUB_IDS = ("Qwen/Qwen3-0.6B", "meta-llama/Llama-3.1-8B")
SFT_PAGES = ("README.md", "docs/lfu.md")
# a page's snippets together must finish within this many seconds (CI stays fast; a longer one is a bug to fix)
PAGE_SECONDS = 90


def snippets(relpath: str) -> list[tuple[int, str, str | None]]:
    """`(line, code, no_run_reason)` of every ```python block of a Markdown file (line: of the opening fence)."""
    with open(os.path.join(ROOT, relpath)) as f:
        text = f.read()
    out = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = [row.strip() for row in text[: match.start()].splitlines() if row.strip()]
        marker = NO_RUN.match(before[-1]) if before else None
        out.append((line, textwrap.dedent(match.group("code")), marker.group(1) if marker else None))
    return out


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _classification(n: int = 8, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, 8), generator=g)
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": torch.randint(0, 3, (n,), generator=g).tolist(),
        }
    )


def _sft(n: int = 8, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (k,), generator=g).tolist())

    return datasets.Dataset.from_dict(
        {"prompt": [words(4) for _ in range(n)], "completion": [words(3) for _ in range(n)]}
    )


@pytest.fixture(scope="module")
def hub_standins(tmp_path_factory) -> str:
    """A tiny Llama and its tokenizer saved like a Hub checkpoint: what the docs' Hub ids are replaced by."""
    path = tmp_path_factory.mktemp("hub") / "tiny-causal-lm"
    tiny_llama().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def _standins(relpath: str) -> dict:
    """Fresh stand-ins for what the snippets of `relpath` use without building it (set before every snippet)."""
    from peft import get_peft_model

    import regtune

    ns = {}
    ns["base"] = tiny_bert()
    ns["model"] = tiny_bert()
    ns["allora_model"] = get_peft_model(
        tiny_bert(), regtune.ALLoRAConfig(r=4, eta=2.0, target_modules=["query", "key", "value", "dense"])
    )
    for name in ("train", "train_ds", "ds"):
        ns[name] = _classification()
    for name in ("dev", "eval_ds"):
        ns[name] = _classification(seed=1)
    if relpath in SFT_PAGES:
        ns["ds"] = _sft()
    from transformers import TrainingArguments

    ns["args"] = TrainingArguments("out", max_steps=2, per_device_train_batch_size=4, report_to="none")
    return ns


class SnippetTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(deadline: float):
    """Raise `SnippetTimeout` in the running snippet at `deadline` (SIGALRM; the main thread, as pytest runs tests)."""
    if not hasattr(signal, "setitimer"):  # no SIGALRM (Windows): no limit
        yield
        return
    seconds = max(deadline - time.monotonic(), 0.001)

    def expire(signum, frame):
        raise SnippetTimeout(f"the page's snippets ran past {PAGE_SECONDS} s: make them cheaper or mark them no-run")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _prepare(code: str, hub_dir: str) -> str:
    for hub_id in HUB_IDS:
        code = code.replace(f'"{hub_id}"', repr(hub_dir)).replace(f"'{hub_id}'", repr(hub_dir))
    return code


def test_snippets_are_found_and_markers_have_reasons():
    found = {relpath: snippets(relpath) for relpath in DOCS}
    assert len(found["README.md"]) >= 4 and len(found["docs/regularizers.md"]) >= 3
    for relpath in DOCS:
        with open(os.path.join(ROOT, relpath)) as f:
            for number, row in enumerate(f, 1):
                if "no-run" in row:
                    assert NO_RUN.match(row.strip()), (
                        f"{relpath}:{number}: write the marker as <!-- no-run: reason -->"
                    )


@pytest.mark.slow
@pytest.mark.parametrize("relpath", [relpath for relpath in DOCS if snippets(relpath)])
def test_docs_snippets_run(relpath, hub_standins, tmp_path, monkeypatch):
    blocks = snippets(relpath)
    # the working directory stands for the repository root: its recipes/ and bench/, and ../shared/ next to it
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    for folder in ("recipes", "bench"):
        os.symlink(os.path.join(ROOT, folder), work / folder)
    if os.path.isdir(os.path.join(ROOT, "..", "shared")):
        os.symlink(os.path.realpath(os.path.join(ROOT, "..", "shared")), tmp_path / "shared")
    ns = {"__name__": f"docs_snippet_{os.path.basename(relpath)}"}
    deadline = time.monotonic() + PAGE_SECONDS
    failures = []
    for line, code, reason in blocks:
        if reason is not None:
            continue
        ns.update(_standins(relpath))  # the reader's own model and data: fresh for every snippet
        try:
            with _time_limit(deadline):
                exec(compile(_prepare(code, hub_standins), f"{relpath}:{line}", "exec"), ns)
        except Exception as err:  # noqa: BLE001 - reported below with the snippet's place
            frames = [frame for frame in traceback.extract_tb(err.__traceback__) if frame.filename.startswith(relpath)]
            where = f"{relpath}:{line + frames[-1].lineno}" if frames else f"{relpath}:{line}"
            failures.append(f"{where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    assert not failures, "snippets that do not run as written:\n" + "\n".join(failures)
