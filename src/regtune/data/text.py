"""Plain text for language-model studies: read a file or a Hub corpus, tokenize it, hold out its end, cut blocks."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset


def split_text(text: str, heldout_fraction: float) -> tuple[str, str]:
    """
    Split `text` into a training part and a held-out part made of its last `heldout_fraction` of characters.

    The cut is moved forward to the next line start (when there is one within the held-out part), so that no line
    is split between the two.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"`heldout_fraction` must be in (0, 1), got {heldout_fraction!r}.")
    cut = int(len(text) * (1 - heldout_fraction))
    newline = text.find("\n", cut)
    if newline != -1 and newline + 1 < len(text):
        cut = newline + 1
    return text[:cut], text[cut:]


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, with an error naming the resolved path when it is missing."""
    resolved = os.path.abspath(path)
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f"Text file {str(path)!r} not found (resolved to {resolved}).")
    with open(resolved, encoding="utf-8") as f:
        return f.read()


def tokenize_text(tokenizer, text: str, chunk_chars: int = 1 << 20) -> torch.Tensor:
    """
    Token ids of `text` without special tokens, as a 1-D `torch.long` tensor.

    Long texts are encoded in pieces of about `chunk_chars` characters cut at line ends (a subword tokenizer may
    tokenize across a cut differently; character and byte tokenizers do not).
    """
    pieces, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            newline = text.find("\n", end)
            end = len(text) if newline == -1 else newline + 1
        pieces.append(text[start:end])
        start = end
    ids: list[int] = []
    for piece in pieces:
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def hub_text_tokens(
    tokenizer,
    max_tokens: int,
    path: str,
    name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = True,
    data_files=None,
    batch_size: int = 256,
) -> torch.Tensor:
    """
    The first `max_tokens` token ids of a `datasets` corpus (documents joined by the tokenizer's EOS token).

    Args:
        tokenizer: the tokenizer.
        max_tokens (`int`): how many tokens to read.
        path, name, split, data_files: the arguments of `datasets.load_dataset` (e.g.
            `path="HuggingFaceFW/fineweb-edu", name="sample-10BT"`, or `path="text", data_files=...` for local files).
        text_column (`str`, defaults to `"text"`): the column holding the documents.
        streaming (`bool`, defaults to `True`): stream the corpus instead of downloading all of it.
        batch_size (`int`, defaults to 256): documents tokenized at a time.

    Raises:
        `ValueError`: when the corpus has fewer than `max_tokens` tokens or no `text_column`.
    """
    import datasets

    dataset = datasets.load_dataset(path, name, split=split, streaming=streaming, data_files=data_files)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for doc in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            if eos is not None:
                ids.append(eos)
        batch.clear()

    for row in dataset:
        if text_column not in row:
            raise ValueError(f"The corpus {path!r} has no column {text_column!r}; its columns: {sorted(row)}.")
        batch.append(row[text_column])
        if len(batch) == batch_size:
            flush()
            if len(ids) >= max_tokens:
                break
    if batch:
        flush()
    if len(ids) < max_tokens:
        raise ValueError(f"The corpus {path!r} ({split}) has {len(ids)} tokens, fewer than the {max_tokens} needed.")
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def make_blocks(ids: torch.Tensor, block_size: int, num_blocks: int | None = None) -> torch.Tensor:
    """
    Cut a 1-D tensor of token ids into consecutive, non-overlapping blocks: a `(num_blocks, block_size)` tensor.

    Args:
        ids (`torch.Tensor`): the token ids.
        block_size (`int`): tokens per block.
        num_blocks (`int`, *optional*): how many blocks (from the start); defaults to all complete blocks.

    Raises:
        `ValueError`: when `ids` holds fewer than `num_blocks` complete blocks.
    """
    available = ids.numel() // block_size
    if num_blocks is None:
        num_blocks = available
    if num_blocks > available:
        raise ValueError(
            f"Need {num_blocks} blocks of {block_size} tokens ({num_blocks * block_size} tokens), but only "
            f"{ids.numel()} tokens are available."
        )
    return ids[: num_blocks * block_size].reshape(num_blocks, block_size).clone()


class BlockDataset(Dataset):
    """A causal-LM dataset of fixed-length blocks: `{"input_ids": block, "labels": block}` (the model shifts)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}


def nested_block_subset(ids: torch.Tensor, block_size: int, num_blocks: int, seed: int = 0) -> torch.Tensor:
    """
    `num_blocks` blocks drawn at random, without replacement, from all complete blocks of `ids`.

    For one `seed` the blocks come from a single permutation, so a smaller subset is contained in every larger one
    (nested subsets), and each subset is spread over the whole text instead of being its beginning (with a book or a
    corpus sorted by source, a prefix would also narrow the topics).
    """
    pool = make_blocks(ids, block_size)
    if num_blocks > pool.shape[0]:
        raise ValueError(f"Need {num_blocks} blocks of {block_size} tokens, but the text holds {pool.shape[0]}.")
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))
    return pool[order[:num_blocks]].clone()
