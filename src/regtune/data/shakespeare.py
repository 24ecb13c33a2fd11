"""One speaker's turns of Tiny Shakespeare as prompt/completion pairs, plus held-out text to measure forgetting.

The built-in task `shakespeare-turns` (`data: {builtin: shakespeare-turns, options: {...}}`) reads
`text/input.txt` under `data_dir` (Tiny Shakespeare; by default `../shared/data`, relative to the working
directory). The first 90% of the corpus is the *training text*, the last 10% (other plays) the *held-out text*.

- Every turn of `speaker` in the training text becomes a pair: the prompt is the end of the previous turn
  (`ctx_chars` characters), a blank line and `"<SPEAKER>:\\n"`; the completion is the turn (cut at a word boundary
  to at most `completion_chars` characters). The pairs are shuffled with a fixed seed (0) and split into `train`
  (`n_train` pairs), `validation` (`n_val`) and `test` (the rest).
- `held_out`: `n_held_out` evenly spaced windows of `window_chars` characters of the held-out text, as
  language-modeling `text`. A run's loss there, minus the pretrained model's, is how much it forgot.

[`pretraining_text`] is the training text without the speaker's turns: what a model is pretrained on before it is
fine-tuned on those turns (`bench/char_llama.py` does it for the LfU evidence recipe).
"""

from __future__ import annotations

import inspect
import os
import random

from .fewshot_text import DEFAULT_DATA_DIR


CORPUS_FILE = os.path.join("text", "input.txt")
HELD_OUT_FRACTION = 0.1
PAIR_SEED = 0
OPTION_RANGES = {  # checked when a recipe is validated
    "ctx_chars": {"ge": 1}, "completion_chars": {"ge": 1}, "n_train": {"ge": 1}, "n_val": {"ge": 0},
    "n_held_out": {"ge": 1}, "window_chars": {"ge": 2},
}  # fmt: skip


def read_corpus(data_dir: str = DEFAULT_DATA_DIR) -> tuple[str, str]:
    """The training text (first 90% of the corpus) and the held-out text (the rest)."""
    with open(os.path.join(data_dir, CORPUS_FILE)) as f:
        text = f.read()
    cut = int((1 - HELD_OUT_FRACTION) * len(text))
    return text[:cut], text[cut:]


def speaker_pairs(
    train_text: str, speaker: str = "GLOUCESTER", ctx_chars: int = 120, completion_chars: int = 160
) -> tuple[list[tuple[str, str]], str]:
    """The speaker's turns as (context, turn) pairs, and the training text without them (for pretraining)."""
    blocks = train_text.split("\n\n")
    pairs, kept = [], []
    for i, block in enumerate(blocks):
        if block.startswith(speaker + ":\n") and i > 0:
            turn = block[len(speaker) + 2 :]
            if len(turn) > completion_chars:
                turn = turn[:completion_chars].rsplit(" ", 1)[0]
            pairs.append((blocks[i - 1][-ctx_chars:], turn))
        else:
            kept.append(block)
    return pairs, "\n\n".join(kept)


def pretraining_text(data_dir: str = DEFAULT_DATA_DIR, speaker: str = "GLOUCESTER") -> str:
    """The training text without `speaker`'s turns."""
    return speaker_pairs(read_corpus(data_dir)[0], speaker)[1]


def render_prompt(ctx: str, speaker: str = "GLOUCESTER") -> str:
    """The prompt of a turn: the previous turn's end and the speaker's name, in the corpus' own format."""
    return f"{ctx}\n\n{speaker}:\n"


def held_out_windows(text: str, windows: int = 48, window_chars: int = 128) -> list[str]:
    """`windows` evenly spaced windows of `window_chars` characters of `text`."""
    step = (len(text) - window_chars) // windows
    return [text[i * step : i * step + window_chars] for i in range(windows)]


def shakespeare_turns(
    data_dir: str = DEFAULT_DATA_DIR,
    speaker: str = "GLOUCESTER",
    ctx_chars: int = 80,
    completion_chars: int = 120,
    n_train: int = 144,
    n_val: int = 24,
    n_held_out: int = 48,
    window_chars: int = 128,
):
    """
    Build the splits `train`, `validation`, `test` (prompt/completion) and `held_out` (text).

    Args:
        data_dir (`str`, defaults to `"../shared/data"`): the folder holding `text/input.txt`.
        speaker (`str`, defaults to `"GLOUCESTER"`): whose turns are the fine-tuning task.
        ctx_chars (`int`, defaults to 80): characters of the previous turn in each prompt.
        completion_chars (`int`, defaults to 120): the longest completion (cut at a word boundary).
        n_train (`int`, defaults to 144): training pairs.
        n_val (`int`, defaults to 24): validation pairs (for choosing a learning rate; the rest is `test`).
        n_held_out (`int`, defaults to 48): windows of held-out text.
        window_chars (`int`, defaults to 128): characters per held-out window.
    """
    from datasets import Dataset, DatasetDict

    train_text, held_out_text = read_corpus(data_dir)
    pairs, _ = speaker_pairs(train_text, speaker, ctx_chars, completion_chars)
    random.Random(PAIR_SEED).shuffle(pairs)
    problem = _split_problem(n_train, n_val, speaker, len(pairs))
    if problem:
        raise ValueError(problem)

    def as_dataset(rows):
        return Dataset.from_dict(
            {"prompt": [render_prompt(ctx, speaker) for ctx, _ in rows], "completion": [turn for _, turn in rows]}
        )

    return DatasetDict(
        train=as_dataset(pairs[:n_train]),
        validation=as_dataset(pairs[n_train : n_train + n_val]),
        test=as_dataset(pairs[n_train + n_val :]),
        held_out=Dataset.from_dict({"text": held_out_windows(held_out_text, n_held_out, window_chars)}),
    )


def _split_problem(n_train: int, n_val: int, speaker: str, turns: int) -> str | None:
    """Why `n_train` and `n_val` do not fit the speaker's `turns` (no test pairs would be left), or `None`."""
    if n_train + n_val < turns:
        return None
    return (
        f"n_train + n_val = {n_train + n_val} leaves no test pairs: {speaker} has {turns} turns in the training text"
    )


def check_options(options: dict) -> list[tuple[str, str]]:
    """Problems of the options (`(option, message)`): a missing corpus, a speaker without turns, too few turns."""
    options = {**_DEFAULTS, **options}
    data_dir = options["data_dir"]
    if not os.path.isfile(os.path.join(data_dir, CORPUS_FILE)):
        return [
            (
                "data_dir",
                f"shakespeare-turns needs {CORPUS_FILE} under data_dir={data_dir!r} (resolved to "
                f"{os.path.abspath(data_dir)}); set data.options.data_dir to the folder that holds it",
            )
        ]
    speaker = options["speaker"]
    if not isinstance(speaker, str) or not speaker:
        return [
            ("speaker", f"expected a speaker's name as it appears in the corpus (e.g. GLOUCESTER), got {speaker!r}")
        ]
    n_train, n_val = options["n_train"], options["n_val"]
    if not all(isinstance(n, int) for n in (n_train, n_val)):
        return []  # the option ranges report the types
    try:
        turns = len(speaker_pairs(read_corpus(data_dir)[0], speaker)[0])
    except (OSError, UnicodeDecodeError) as e:
        return [("data_dir", f"cannot read {CORPUS_FILE} under {data_dir!r}: {e}")]
    if turns == 0:
        return [("speaker", f"{speaker!r} has no turns in the training text (names are upper case, e.g. GLOUCESTER)")]
    problem = _split_problem(n_train, n_val, speaker, turns)
    return [("n_train", problem)] if problem else []


# the build function's defaults, which check_options assumes for options a recipe leaves out
_DEFAULTS = {name: p.default for name, p in inspect.signature(shakespeare_turns).parameters.items()}
