"""Character- and byte-level tokenizers built in memory, so that small language-model studies download nothing.

Both are ordinary `transformers` fast tokenizers (a `tokenizers.Tokenizer` inside `PreTrainedTokenizerFast`): they
save with `save_pretrained` and load back with `AutoTokenizer.from_pretrained`, and the models trained with them can
be published like any other.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast


SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}
"""The special tokens of both tokenizers, with ids 0, 1, 2, 3."""

BUILTIN_TOKENIZERS = ("char", "byte")


def _wrap(backend: Tokenizer, name: str) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.name_or_path = name
    return tokenizer


def build_char_tokenizer(text: str | Iterable[str] | None = None, chars: Iterable[str] | None = None):
    """
    Build a character-level tokenizer: one token per Unicode character of the vocabulary, `[UNK]` for the others.

    Example:

    ```py
    >>> tokenizer = build_char_tokenizer(open("input.txt").read())  # Tiny Shakespeare: 65 characters
    >>> tokenizer("To be")["input_ids"]
    [36, 57, 5, 44, 47]
    >>> tokenizer.decode([36, 57, 5, 44, 47])
    'To be'
    ```

    Args:
        text (`str` or `Iterable[str]`, *optional*): text whose distinct characters form the vocabulary.
        chars (`Iterable[str]`, *optional*): the characters of the vocabulary, instead of (or added to) `text`'s.

    Returns:
        `PreTrainedTokenizerFast`: ids 0-3 are `[PAD]`, `[UNK]`, `[BOS]`, `[EOS]`, then the characters in sorted
        order. It adds no special tokens when encoding, and decoding joins characters without spaces.
    """
    vocabulary: set[str] = set()
    if text is not None:
        for piece in [text] if isinstance(text, str) else text:
            vocabulary.update(piece)
    if chars is not None:
        for char in chars:
            if not isinstance(char, str) or len(char) != 1:
                raise ValueError(f"`chars` must hold single characters, got {char!r}.")
            vocabulary.add(char)
    if not vocabulary:
        raise ValueError("build_char_tokenizer needs `text` or `chars` with at least one character.")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for char in sorted(vocabulary):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()
    return _wrap(backend, "regtune-char")


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """
    Build a byte-level tokenizer: one token per UTF-8 byte (256 tokens after the 4 special ones); needs no vocabulary.

    It is GPT-2's byte-level encoding without merges, so any text round-trips exactly.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for char in alphabet:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return _wrap(backend, "regtune-byte")


def load_text_tokenizer(name: str, text: str | None = None):
    """
    Return the tokenizer `name`: `"char"` (built from the characters of `text`), `"byte"`, or anything
    `AutoTokenizer.from_pretrained` accepts (a Hub id such as `"gpt2"`, or a local directory).
    """
    if name == "char":
        if text is None:
            raise ValueError("The 'char' tokenizer is built from the training text; pass `text`.")
        return build_char_tokenizer(text)
    if name == "byte":
        return build_byte_tokenizer()
    return AutoTokenizer.from_pretrained(name)
