"""The length cap of a trained byte-level BPE, on Han only: tokens of at most `max_token_length` Han
characters, while Latin words, identifiers, URLs and indentation may be longer.

`tokenizers`' BpeTrainer has one cap, `max_token_length`, in byte symbols, the same for every script
(tokenizers/src/models/bpe/trainer.rs); no per-script rule. A cap of 3 x 4 + 1 symbols that keeps
Han tokens at 4 characters also cuts `DeprecationWarning`, 16 spaces of indentation and a Han run
after a leading punctuation mark (`，疑是地` is 12 bytes; qwen2 joins the mark to the run). So the
trainer runs with a cap for the longest non-Han token and a slightly larger vocabulary, and then
cap_han_tokens drops every merge whose token holds more Han characters than allowed (and every merge
built on a dropped token), keeping the first `vocab_size` tokens that remain. The result is a plain
BPE (vocab + merges) in a stock tokenizer.json; encoding with fewer merges is ordinary BPE.
docs/tokenizer.md ("Latin, code and the length cap") has the measurements.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Callable

# Han ideographs (Unified, Extension A, Compatibility, Extensions B-H); U+FFFD: part of a character's
# bytes, counted as one, since a partial multi-byte token is nearly always a piece of Han here.
HAN_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF))


def trainer_max_length(max_token_length: int) -> int:
    """BpeTrainer's max_token_length for tokens of up to `max_token_length` Han characters.

    The trainer counts byte-level symbols (a Han character is 3) and only forms a merge whose length
    is strictly below its limit (tokenizers/src/models/bpe/word.rs, `Word::merge`), so 3 * n alone
    would stop at n - 1 characters. Alone (max_latin_token_bytes 0) it caps Latin tokens at 3 * n
    letters too; with the Han-only cap it is the least symbol cap the trainer gets.
    """
    return 3 * max_token_length + 1


def latin_token_bytes(t) -> int:
    """tokenizer.max_latin_token_bytes of a TokenizerConfig, or 0 (the old single cap) for `zh`,
    so zh tokenizers retrain (and hash) as before."""
    return 0 if t.pre_tokenizer == "zh" else t.max_latin_token_bytes


@lru_cache(maxsize=1)
def _byte_level_decoder():
    from tokenizers import decoders

    return decoders.ByteLevel()


def token_text(token: str) -> str:
    """A byte-level token as text (tokenizers' ByteLevel decoder: GPT-2's printable alphabet back
    to bytes, then UTF-8); bytes of an incomplete character decode to U+FFFD."""
    return _byte_level_decoder().decode([token])


def han_characters(token: str) -> int:
    """Han characters (and partial characters) in a byte-level token."""
    return sum(1 for c in token_text(token)
               if c == "\ufffd" or any(lo <= ord(c) <= hi for lo, hi in HAN_RANGES))


def cap_han_tokens(tokenizer_json: str, max_han_chars: int, vocab_size: int) -> tuple[str, int]:
    """(tokenizer.json with no token of more than max_han_chars Han characters and at most
    vocab_size tokens, how many merges were dropped for their Han length).

    Walks the merges in rank order: a merge stays when both parts are still tokens and its result
    is within the cap; a result already in the vocabulary (BpeTrainer can reach one string by two
    pairs) keeps its id. Once vocab_size tokens are in, only merges onto existing tokens stay. The
    base tokens (special tokens and the 256 byte symbols: every token no merge produced) keep
    their ids; the merged ones are numbered in rank order as BpeTrainer numbers them."""
    data = json.loads(tokenizer_json)
    model = data["model"]
    produced = {a + b for a, b in ((m.split(" ", 1) if isinstance(m, str) else m) for m in model["merges"])}
    special = {t["content"] for t in data.get("added_tokens", [])}
    by_id = sorted(model["vocab"], key=model["vocab"].get)
    order = [t for t in by_id if t in special or t not in produced]
    kept, merges, dropped = set(order), [], 0
    for merge in model["merges"]:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = a + b
        if a not in kept or b not in kept:
            continue
        if han_characters(token) > max_han_chars:
            dropped += 1
            continue
        if token not in kept:
            if len(order) >= vocab_size:
                continue
            kept.add(token)
            order.append(token)
        merges.append([a, b])
    model["vocab"] = {t: i for i, t in enumerate(order)}
    model["merges"] = merges
    return json.dumps(data, ensure_ascii=False), dropped


def train_capped(train_json: Callable[[int], str], max_han_chars: int, vocab_size: int) -> tuple[str, int]:
    """cap_han_tokens of `train_json(n)` (a trained tokenizer.json of n tokens), trained 1/8 larger
    than vocab_size so that vocab_size tokens remain; retrained with twice the margin while fewer
    remain and the trainer had merges left (it stops early only when the sample has no more)."""
    extra = max(64, vocab_size // 8)
    while True:
        trained = train_json(vocab_size + extra)
        capped, dropped = cap_han_tokens(trained, max_han_chars, vocab_size)
        short = len(json.loads(capped)["model"]["vocab"]) < vocab_size
        if not short or len(json.loads(trained)["model"]["vocab"]) < vocab_size + extra or extra >= 8 * vocab_size:
            return capped, dropped
        extra *= 2
