"""Byte-level BPE for Chinese: train on a bounded, evenly spread sample, or load an existing one.

Why not the usual recipe (ByteLevel pre-tokenizer + BpeTrainer over every text): the trainer keeps
every distinct pre-token ("word") with its pair positions in memory. Unspaced Chinese makes words of
whole clauses, nearly all distinct, so memory grows with the corpus (5.4 GB for 26 M characters of
poetry). Here:
  * Han runs are cut into pre-tokens of at most `max_token_length` characters, so distinct words
    are bounded by the vocabulary of short Han strings, not by the number of clauses;
  * digits are split singly (numbers compose from digits instead of wasting the vocabulary);
  * Latin words, punctuation and whitespace are separate pre-tokens, as in GPT-2/4;
  * training reads at most `tokenizer.sample_bytes` of text, sampled evenly across all files in one
    streaming pass (bottom-k by document hash: deterministic, memory bounded by the sample).
`max_token_length` (in characters; a Han character is 3 UTF-8 bytes, so the trainer's limit is 3x
this in byte symbols) stops the vocabulary memorising whole lines: classical Chinese words are one
or two characters, set phrases four; longer tokens mostly copy frequent titles and lines.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import time
from pathlib import Path
from typing import Iterable, Iterator

from trainer.config import Config

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# ChatML, as used by Qwen: <|im_start|>role\ncontent<|im_end|>\n ...
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PRETOKENIZER_VERSION = "zh-v1"  # bump when the pre-tokenization changes (part of the tokenizer hash)


def pretokenizer_pattern(max_han: int) -> str:
    """Han runs in pieces of <= max_han characters, other letters as words (with a leading space),
    single digits, punctuation runs, newlines and spaces."""
    return (rf"\p{{Han}}{{1,{max_han}}}|"
            r" ?[\p{L}\p{M}&&[^\p{Han}]]{1,32}|"
            r"\p{N}|"
            r" ?[^\s\p{L}\p{N}]{1,16}[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")


def build_pretokenizer(max_han: int):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pretokenizer_pattern(max_han)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def tokenizer_hash(cfg: Config, corpus_fp: str) -> str:
    """Identifies a trained tokenizer: corpus listing, normalisation and every training setting."""
    t, d = cfg.tokenizer, cfg.data
    key = json.dumps({
        "corpus": corpus_fp, "vocab_size": t.vocab_size, "max_token_length": t.max_token_length,
        "min_frequency": t.min_frequency, "sample_bytes": t.sample_bytes, "pre": PRETOKENIZER_VERSION,
        "text_field": d.text_field, "nfkc": d.nfkc, "to_simplified": d.to_simplified,
    }, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def doc_hash(text: str) -> int:
    """64-bit content hash of a document (sampling, validation split, dedup)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def sample_documents(docs: Iterable[str], sample_bytes: int) -> list[str]:
    """Bottom-k sample by document hash, capped at sample_bytes of UTF-8: one pass, even across
    files (the hash ignores position), deterministic, and never more than the cap in memory."""
    heap: list[tuple[int, int, str]] = []  # max-heap on hash via negation: (-hash, size, text)
    total = 0
    for text in docs:
        size = len(text.encode("utf-8"))
        h = doc_hash(text)
        if total + size <= sample_bytes:
            heapq.heappush(heap, (-h, size, text))
            total += size
            continue
        # Over budget: the new document goes in only if its hash is smaller than the largest kept.
        if heap and h < -heap[0][0]:
            heapq.heappush(heap, (-h, size, text))
            total += size
            while total > sample_bytes and heap:
                _, s, _ = heapq.heappop(heap)
                total -= s
    heap.sort(key=lambda e: -e[0])  # hash order: deterministic regardless of file order
    return [text for _, _, text in heap]


def train_tokenizer(texts: list[str], vocab_size: int, max_token_length: int, min_frequency: int = 2,
                    threads_batch: int = 1000):
    """Train the byte-level BPE on `texts`; returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = build_pretokenizer(max_token_length)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=3 * max_token_length, show_progress=False,
    )

    def batches() -> Iterator[list[str]]:
        for i in range(0, len(texts), threads_batch):
            yield texts[i:i + threads_batch]

    tok.train_from_iterator(batches(), trainer=trainer, length=len(texts))
    return tok


def wrap_fast(tok):
    """A transformers tokenizer around a `tokenizers.Tokenizer`, with our special tokens and template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None,
                                   unk_token=None, additional_special_tokens=[IM_START, IM_END],
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tok, out_dir: Path) -> None:
    wrap_fast(tok).save_pretrained(str(out_dir))


def load_tokenizer(path: str | Path):
    """Load any Hugging Face tokenizer folder (ours or another project's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def chars_per_token(tok, texts: list[str]) -> float:
    """Compression on held-out text (higher is better); counts characters, not bytes."""
    enc = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else None
    n_tokens = sum(len(e.ids) for e in enc) if enc is not None else sum(len(tok(t)["input_ids"]) for t in texts)
    return sum(len(t) for t in texts) / max(1, n_tokens)


def longest_tokens(tok, k: int = 20) -> list[str]:
    from tokenizers import decoders

    dec = decoders.ByteLevel()
    vocab = tok.get_vocab()
    words = [dec.decode([t]) for t in vocab if t not in SPECIAL_TOKENS]
    return sorted(words, key=len, reverse=True)[:k]


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_report(tok, sample: list[str], heldout: list[str], seconds: float, cfg: Config, extra: dict) -> dict:
    return {
        "vocab_size": tok.get_vocab_size(), "requested_vocab_size": cfg.tokenizer.vocab_size,
        "max_token_length": cfg.tokenizer.max_token_length, "pretokenizer": PRETOKENIZER_VERSION,
        "sample_documents": len(sample), "sample_bytes": sum(len(t.encode()) for t in sample),
        "heldout_documents": len(heldout), "chars_per_token_heldout": round(chars_per_token(tok, heldout), 4),
        "longest_tokens": longest_tokens(tok, 20), "seconds": round(seconds, 2),
        "peak_rss_bytes": peak_rss_bytes(), **extra,
    }


def train_from_corpus(cfg: Config, docs: Iterable[str], out_dir: Path, is_heldout) -> dict:
    """Sample, train, save to out_dir, and return the report (also written as report.json)."""
    start = time.time()
    heldout: list[str] = []
    heldout_bytes = 0

    def train_docs():
        nonlocal heldout_bytes
        for text in docs:
            if is_heldout(text):
                if heldout_bytes < 2_000_000:  # enough to measure compression
                    heldout.append(text)
                    heldout_bytes += len(text.encode())
                continue
            yield text

    sample = sample_documents(train_docs(), cfg.tokenizer.sample_bytes)
    if not sample:
        raise ValueError("no documents to train the tokenizer on (every document was filtered or held out)")
    tok = train_tokenizer(sample, cfg.tokenizer.vocab_size, cfg.tokenizer.max_token_length,
                          cfg.tokenizer.min_frequency)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, out_dir)
    report = build_report(tok, sample, heldout or sample[:100], time.time() - start, cfg, {})
    (out_dir / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return report
