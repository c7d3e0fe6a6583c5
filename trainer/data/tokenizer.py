"""Byte-level BPE for Chinese: train on a bounded, evenly spread sample, or load an existing one.

Why not the usual recipe (ByteLevel pre-tokenizer + BpeTrainer over every text): the trainer keeps
every distinct pre-token ("word") in memory, as a vector of 32-byte symbols (one per byte) plus the
set of words each byte pair occurs in. Unspaced Chinese makes words of whole clauses, nearly all
distinct, so memory grows with the corpus (5.4 GB for 26 M characters of poetry). Here:
  * training reads at most `tokenizer.sample_bytes` of text, sampled evenly in one streaming pass
    (bottom-k by document hash: deterministic, memory bounded by the sample) over the documents of
    a bounded, evenly spread read of the corpus (trainer/data/sample.py: twice the sample, so its
    cost does not grow with the corpus). The trainer's memory is about 100 bytes per sampled byte
    of Chinese, whatever the corpus size and whatever the split. The merges run in a child process
    (train_in_child), so a signal stops the job at once and their memory goes when they end;
  * the split (`tokenizer.pre_tokenizer`) is by default Qwen2's: Han runs whole (one leading
    punctuation mark joins them), Latin words, single digits, punctuation runs with the newlines
    after them. llama.cpp implements it (and `deepseek-llm`, `gpt-2`) under the same name, so an
    export converts to GGUF (scripts/convert_to_gguf.py). It gives 4-7% more characters per token
    than our own `zh` split on poetry, news and reviews (docs/tokenizer.md);
  * `zh`, the default before 2026-11-30 and kept so those tokenizers retrain identically, cuts Han
    runs into pre-tokens of at most `han_chunk_chars(max_token_length)` characters and keeps
    punctuation apart from Han; llama.cpp has no such split (scripts/convert_to_gguf.py refuses it);
  * `max_token_length` (characters of Han; the trainer counts byte symbols, 3 per Han character)
    stops the vocabulary memorising titles and lines: classical words are one or two characters,
    set phrases four. Since 2026-12-03 it caps Han only (trainer/data/token_length.py), and
    `max_latin_token_bytes` the rest, so Latin words, identifiers and indentation are not cut at
    12 bytes. docs/tokenizer.md has the measurements behind each choice.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from trainer.config import Config
from trainer.data.child_process import call_in_child
from trainer.data.sources import DataError
from trainer.data.token_length import latin_token_bytes, train_capped, trainer_max_length
from trainer.errors import stop_on_signals
from trainer.log import logger

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

PRETOKENIZER_VERSION = "zh-v2"  # bump when the pre-tokenization changes (part of the tokenizer hash)
HAN_CHUNK_TOKENS = 4  # a Han pre-token is this many max-length tokens long (docs/tokenizer.md)
HELDOUT_BYTES = 2_000_000  # held-out text kept to measure compression in the report
SAMPLE_PIECES = 16  # a document over 1/16 of tokenizer.sample_bytes is sampled in pieces of that size
PROGRESS_SECONDS = 30.0  # at most one progress line per this many seconds while reading the corpus

# Pre-tokenizers that llama.cpp implements, by the name the GGUF key tokenizer.ggml.pre takes
# (llama.cpp src/llama-vocab.cpp, llama_vocab::impl::load; the patterns are its `regex_exprs`).
# qwen2: Qwen2's tokenizer.json. Han runs are whole \p{L}+ words; one leading punctuation mark joins them.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# deepseek-llm: DeepSeek LLM's tokenizer.json, six splits applied in turn: newlines, Latin/Greek/
# Cyrillic... words, ASCII and CJK punctuation, trailing space, CJK (Han, Hangul) runs, digit runs.
DEEPSEEK_LLM_PATTERNS = (
    '[\r\n]',
    '\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+',
    '\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+',
    '\\s+$',
    '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+',
    '\\p{N}+',
)
# tokenizer.pre_tokenizer -> llama.cpp's name (None: llama.cpp has no such split).
# gpt-2: ByteLevel's own regex (GPT-2's), i.e. the usual recipe.
LLAMA_CPP_PRE = {"zh": None, "qwen2": "qwen2", "deepseek-llm": "deepseek-llm", "gpt-2": "gpt-2"}


def han_chunk_chars(max_token_length: int) -> int:
    """Longest Han pre-token. 4 tokens' worth: shorter chunks force token boundaries at fixed
    offsets (chunk 6 loses 2% compression on poetry against 16), longer ones gain nothing."""
    return HAN_CHUNK_TOKENS * max_token_length


def pretokenizer_pattern(han_chunk: int) -> str:
    """Han runs in pieces of <= han_chunk characters, other letters as words (with a leading space),
    single digits, punctuation runs with the newlines after them, newlines, spaces."""
    return (rf"\p{{Han}}{{1,{han_chunk}}}|"
            r" ?[\p{L}\p{M}&&[^\p{Han}]]{1,32}|"
            r"\p{N}|"
            r" ?[^\s\p{L}\p{N}]{1,16}[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")


def build_pretokenizer(han_chunk: int, kind: str = "zh"):
    """The `tokenizers` pre-tokenizer of `tokenizer.pre_tokenizer` = kind (a key of LLAMA_CPP_PRE);
    han_chunk (characters) only shapes "zh". Raises ValueError for another kind."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if kind == "zh":
        patterns = [pretokenizer_pattern(han_chunk)]
    elif kind == "qwen2":
        patterns = [QWEN2_PATTERN]
    elif kind == "deepseek-llm":
        patterns = list(DEEPSEEK_LLM_PATTERNS)
    elif kind == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"unknown pre-tokenizer {kind!r} (one of {', '.join(LLAMA_CPP_PRE)})")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
                                   + [byte_level])


def llama_cpp_pre_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer in a tokenizer.json (parsed), or None when it is not
    one llama.cpp implements (our "zh" split, or another project's). Matches on the serialised
    pre-tokenizer, whatever the vocabulary: llama.cpp's converter identifies pre-tokenizers by
    hashing token ids, which no newly trained vocabulary reproduces (scripts/convert_to_gguf.py)."""
    from tokenizers import Tokenizer, models

    pre = tokenizer_json.get("pre_tokenizer")
    for kind, name in LLAMA_CPP_PRE.items():
        if name is None:
            continue
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = build_pretokenizer(0, kind)
        if json.loads(probe.to_str())["pre_tokenizer"] == pre:
            return name
    return None


def tokenizer_hash(cfg: Config, corpus_fp: str, sample: str = "") -> str:
    """Identifies a trained tokenizer: corpus listing, which documents it sees, and every setting.
    `sample` (trainer/data/sample.py sample_key) says how a corpus larger than the read budget is
    read; "" (a corpus read whole) leaves the key as it was before the spread read existed."""
    t, d = cfg.tokenizer, cfg.data
    key = {
        "corpus": corpus_fp, "vocab_size": t.vocab_size, "max_token_length": t.max_token_length,
        "min_frequency": t.min_frequency, "sample_bytes": t.sample_bytes,
        # "zh" keeps its old key, so tokenizers trained before tokenizer.pre_tokenizer existed are reused
        "pre": PRETOKENIZER_VERSION if t.pre_tokenizer == "zh" else t.pre_tokenizer,
        "text_field": d.text_field, "nfkc": d.nfkc, "to_simplified": d.to_simplified,
        "min_chars": d.min_chars, "max_chars": d.max_chars, "val_permille": d.val_permille,
    }
    if sample:
        key["sample"] = sample
    if latin_token_bytes(t):  # the Han-only cap (2026-12-03); 0 and zh keep the key as it was
        key["latin_token_bytes"] = latin_token_bytes(t)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def hash_bytes(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def doc_hash(text: str) -> int:
    """64-bit content hash of a document (sampling, validation split, dedup)."""
    return hash_bytes(text.encode("utf-8"))


def sample_documents(docs: Iterable[str], sample_bytes: int, seen: Counter | None = None) -> list[str]:
    """The documents of smallest hash, in hash order, up to the first that would take the total
    past sample_bytes of UTF-8. One streaming pass holding at most the cap; the result depends on
    the set of documents only (not on file or line order), spreads evenly over the files (a hash
    ignores position) and nests (a smaller cap keeps a subset). `seen` counts what was read."""
    heap: list[tuple[int, int, str]] = []  # max-heap on hash via negation: (-hash, size, text)
    total = n_docs = n_bytes = 0
    bound = 1 << 64  # every document with this hash or above is out, whatever comes later
    for text in docs:
        data = text.encode("utf-8")
        size, h = len(data), hash_bytes(data)
        n_docs += 1
        n_bytes += size
        if h >= bound:
            continue
        heapq.heappush(heap, (-h, size, text))
        total += size
        while total > sample_bytes:  # evict from the top: more documents only make prefixes longer
            neg_h, s, _ = heapq.heappop(heap)
            total -= s
            bound = -neg_h
    if seen is not None:
        seen.update(documents=n_docs, bytes=n_bytes)
    heap.sort(key=lambda e: -e[0])
    return [text for _, _, text in heap]


def sample_pieces(text: str, max_bytes: int) -> list[str]:
    """`text` cut into pieces of at most `max_bytes` (>= 4) of UTF-8, each cut right after the last
    line break in its second half, or else at a character boundary; a text that fits is one piece.
    Sampling pieces instead of whole documents lets one long document (a novel without blank lines)
    train a tokenizer, and keeps any one document from filling the sample."""
    if len(text) * 4 <= max_bytes:  # fits whatever its characters (UTF-8 has at most 4 bytes each)
        return [text]
    data = text.encode("utf-8")
    pieces, start = [], 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        cut = data.rfind(b"\n", start + max_bytes // 2, end)
        if cut >= 0:
            end = cut + 1
        else:
            while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: the cut would split a character
                end -= 1
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    pieces.append(data[start:].decode("utf-8"))
    return pieces


def train_tokenizer(texts: list[str], vocab_size: int, max_token_length: int, min_frequency: int = 2,
                    han_chunk: int | None = None, pre_tokenizer: str = "zh", max_latin_bytes: int = 0):
    """Train the byte-level BPE on `texts`; returns a `tokenizers.Tokenizer`. `han_chunk` overrides
    han_chunk_chars(max_token_length) (scripts/bench_tokenizer.py --sweep measures the choice);
    `pre_tokenizer` is a key of LLAMA_CPP_PRE (ValueError otherwise); the job passes
    tokenizer.pre_tokenizer (default qwen2), callers that pass nothing get zh, which the tests' small
    tokenizers were written against. `max_latin_bytes` (the job: latin_token_bytes(cfg.tokenizer))
    > 0 caps only Han at max_token_length characters and other tokens at that many bytes
    (trainer/data/token_length.py); 0 caps every token at trainer_max_length symbols, as before.

    Logs through trainer.log when the sample has been read into the trainer and when the merges
    are done; `tokenizers`' own progress bars are drawn only on an interactive terminal."""
    import sys

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = build_pretokenizer(han_chunk or han_chunk_chars(max_token_length), pre_tokenizer)
    tok.decoder = decoders.ByteLevel()
    start = time.time()

    def fed(n_tokens: int) -> Iterator[str]:
        yield from texts
        # The iterator is drained: Rust has counted the words and now counts pairs and merges.
        logger.info(f"tokenizer: counted the words of {len(texts)} texts in {time.time() - start:.1f} s; "
                    f"merging to {n_tokens} tokens")

    def trained_json(n_tokens: int, max_symbols: int) -> str:
        trainer = trainers.BpeTrainer(
            vocab_size=n_tokens, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=max_symbols,
            show_progress=sys.stderr.isatty())
        # One text per item: the binding copies 256 items at a time into Rust, so batching here would
        # only copy more of the sample at once; the Rust side spreads pre-tokenization over all cores.
        tok.train_from_iterator(fed(n_tokens), trainer=trainer, length=len(texts))
        return tok.to_str()

    if max_latin_bytes:  # the cap on Han only (trainer/data/token_length.py)
        symbols = max(trainer_max_length(max_token_length), max_latin_bytes + 1)
        capped, dropped = train_capped(lambda n: trained_json(n, symbols), max_token_length, vocab_size)
        tok = Tokenizer.from_str(capped)
        logger.info(f"tokenizer: dropped {dropped} merges of more than {max_token_length} Han characters")
    else:
        trained_json(vocab_size, trainer_max_length(max_token_length))
    logger.info(f"tokenizer: {tok.get_vocab_size()} tokens trained in {time.time() - start:.1f} s")
    return tok


def train_in_child(texts: list[str], vocab_size: int, max_token_length: int, min_frequency: int,
                   pre_tokenizer: str, max_latin_bytes: int = 0):
    """train_tokenizer in a child process (trainer/data/child_process.py: a signal to this process
    kills it at once, where the Rust merges would not return to a handler here until done); returns
    (the `tokenizers.Tokenizer`, the child's peak RSS in bytes). The same tokenizer as in-process:
    it comes back as its tokenizer.json string (tests/test_tokenizer_signal.py compares the bytes)."""
    from tokenizers import Tokenizer

    json_text, rss = call_in_child(_trained_json, (texts, vocab_size, max_token_length, min_frequency,
                                                   pre_tokenizer, max_latin_bytes), name="tokenizer training")
    return Tokenizer.from_str(json_text), rss


def _trained_json(texts, vocab_size, max_token_length, min_frequency, pre_tokenizer,
                  max_latin_bytes) -> tuple[str, int]:
    tok = train_tokenizer(texts, vocab_size, max_token_length, min_frequency, pre_tokenizer=pre_tokenizer,
                          max_latin_bytes=max_latin_bytes)
    return tok.to_str(), peak_rss_bytes()


def wrap_fast(tok):
    """A transformers tokenizer around a `tokenizers.Tokenizer`, with our special tokens and template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None,
                                   unk_token=None, additional_special_tokens=[IM_START, IM_END],
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# tokenizer_config.json keys that describe where a tokenizer was loaded from, not the tokenizer
# (transformers 5 writes is_local / local_files_only after from_pretrained, and "backend").
LOAD_TIME_KEYS = ("is_local", "local_files_only", "backend", "name_or_path", "_commit_hash", "tokenizer_file",
                  "cache_dir", "force_download", "proxies", "token", "revision", "subfolder", "trust_remote_code")


def portable_tokenizer_config(config: dict, model_max_length: int | None, chat_template: str | None) -> dict:
    """tokenizer_config.json that transformers 4 (>= 4.46) and 5 both load with AutoTokenizer.

    transformers 5 names its tokenizers.json-backed class `TokenizersBackend`, which 4.x does not
    know (ValueError at load): PreTrainedTokenizerFast is that class's name in both. Its
    `extra_special_tokens` list is `additional_special_tokens` in 4.x (where extra_special_tokens
    must be a dict of named tokens). model_max_length (tokens; the model's context) replaces the
    1e30 "no limit" default; None keeps what is there. The chat template is written inline, where
    every version reads it. Other classes (a Qwen2Tokenizer loaded from elsewhere) keep their name.
    """
    config = {k: v for k, v in config.items() if k not in LOAD_TIME_KEYS}
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = list(dict.fromkeys(config.get("additional_special_tokens", []) + extra))
    elif extra:  # named tokens (a dict): the same meaning in 4.x and 5.x
        config["extra_special_tokens"] = extra
    if model_max_length is not None:
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
            raise ValueError(f"model_max_length must be a positive number of tokens (got {model_max_length!r})")
        config["model_max_length"] = model_max_length
    if chat_template:
        config["chat_template"] = chat_template
    # Without it transformers 4.x returns token_type_ids, which `model.generate(**tok(p, return_tensors="pt"))`
    # passes on to LlamaForCausalLM (ValueError: unused model_kwargs). A tokenizer's own list is kept.
    config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    return dict(sorted(config.items()))


def save_tokenizer(tok, out_dir: Path, model_max_length: int | None = None) -> None:
    """Write a tokenizer folder that AutoTokenizer loads in transformers 4.x (>= 4.46) and 5.x:
    tokenizer.json and tokenizer_config.json (special tokens, chat template inline, class
    PreTrainedTokenizerFast, no load-time keys; portable_tokenizer_config).

    tok: a `tokenizers.Tokenizer` we trained (wrapped with our special tokens and ChatML template)
    or a loaded transformers tokenizer (saved as it is, e.g. an export's copy of the run's
    tokenizer). model_max_length: the model's context in tokens (max_position_embeddings); None
    for a tokenizer not yet tied to a model. Raises ValueError for a non-positive length.
    """
    fast = wrap_fast(tok) if not hasattr(tok, "save_pretrained") else tok
    out_dir = Path(out_dir)
    fast.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    template_path = out_dir / "chat_template.jinja"  # transformers >= 4.50 writes the template here instead
    template = fast.chat_template if isinstance(fast.chat_template, str) else None
    config = portable_tokenizer_config(json.loads(config_path.read_text(encoding="utf-8")), model_max_length, template)
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if template and template_path.is_file():
        template_path.unlink()  # one copy of the template; the inline one is read by every version


def load_tokenizer(path: str | Path):
    """Load any Hugging Face tokenizer folder (ours or another project's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def backend_of(tok):
    """The `tokenizers.Tokenizer` inside a transformers tokenizer (or the argument itself)."""
    return tok.backend_tokenizer if hasattr(tok, "backend_tokenizer") else tok


def chars_per_token(tok, texts: list[str]) -> float:
    """Compression on held-out text (higher is better); counts characters, not bytes."""
    enc = backend_of(tok).encode_batch(texts, add_special_tokens=False)
    return sum(len(t) for t in texts) / max(1, sum(len(e.ids) for e in enc))


def token_strings(tok) -> list[str]:
    """Readable text of every non-special token (byte-level symbols decoded). A token holding
    only part of a character's bytes decodes to U+FFFD."""
    from tokenizers import decoders

    dec = decoders.ByteLevel()
    return [dec.decode([t]) for t in backend_of(tok).get_vocab() if t not in SPECIAL_TOKENS]


def longest_tokens(tok, k: int = 20) -> list[str]:
    words = [w for w in token_strings(tok) if "\ufffd" not in w]
    return sorted(words, key=lambda w: (-len(w), w))[:k]


def token_length_histogram(tok) -> dict[str, int]:
    """How many tokens have 1, 2, 3... characters (partial characters counted as 0)."""
    counts = Counter(0 if "\ufffd" in w else len(w) for w in token_strings(tok))
    return {str(n): counts[n] for n in sorted(counts)}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_report(tok, sample: list[str], heldout: list[str], seconds: float, cfg: Config, extra: dict) -> dict:
    t = cfg.tokenizer
    backend = backend_of(tok)
    return {
        "vocab_size": backend.get_vocab_size(), "requested_vocab_size": t.vocab_size,
        "max_token_length": t.max_token_length, "han_chunk_chars": han_chunk_chars(t.max_token_length),
        "min_frequency": t.min_frequency, "max_latin_token_bytes": latin_token_bytes(t),
        "pretokenizer": PRETOKENIZER_VERSION if t.pre_tokenizer == "zh" else t.pre_tokenizer,
        "llama_cpp_pre": LLAMA_CPP_PRE.get(t.pre_tokenizer),
        "special_tokens": {s: backend.token_to_id(s) for s in SPECIAL_TOKENS},
        "sample_documents": len(sample), "sample_bytes": sum(len(x.encode()) for x in sample),
        "sample_bytes_cap": t.sample_bytes, "heldout_documents": len(heldout),
        "chars_per_token_heldout": round(chars_per_token(backend, heldout), 4),
        "longest_tokens": longest_tokens(backend, 20), "token_length_histogram": token_length_histogram(backend),
        "seconds": round(seconds, 2), "peak_rss_bytes": peak_rss_bytes(), **extra,
    }


def log_progress(docs: Iterable[str], start: float, every_seconds: float = PROGRESS_SECONDS) -> Iterator[str]:
    """`docs` passed through, with a log line (MB and documents read, MB/s) at most every
    `every_seconds` seconds: reading a large corpus to sample it takes minutes, and a line per
    interval stays readable in a non-interactive log where a progress bar would not."""
    n_docs = n_bytes = 0
    last = time.time()
    for text in docs:
        n_docs += 1
        n_bytes += len(text)  # characters: cheap, and a close lower bound on the UTF-8 bytes read
        now = time.time()
        if now - last >= every_seconds:
            last = now
            logger.info(f"tokenizer: reading the corpus, {n_docs} documents, {n_bytes / 1e6:.1f} M characters "
                        f"({n_bytes / 1e6 / max(now - start, 1e-9):.1f} M/s)")
        yield text


def train_from_corpus(cfg: Config, docs: Iterable[str], out_dir: Path, is_heldout) -> dict:
    """Sample, train, save to out_dir, and return the report (also written as report.json).

    `docs` is read once, as a stream; documents for which `is_heldout(text)` is true never reach
    training, and the first HELDOUT_BYTES of them measure compression in the report. A document over
    sample_bytes / SAMPLE_PIECES is sampled in pieces (sample_pieces). The merges run in a child
    process (train_in_child): until they are done, SIGTERM or SIGINT raises Preempted (exit 75)
    within a second and nothing is saved; after that the caller's handlers apply. Raises DataError
    (exit 2), with the counts, when no text is left to train on."""
    start = time.time()
    heldout: list[str] = []
    heldout_bytes = 0
    seen: Counter = Counter()

    def train_docs() -> Iterator[str]:
        nonlocal heldout_bytes
        for text in log_progress(docs, start):
            if is_heldout(text):
                seen["heldout_documents"] += 1
                if heldout_bytes < HELDOUT_BYTES:
                    heldout.append(text)
                    heldout_bytes += len(text.encode())
                continue
            seen["train_documents"] += 1
            pieces = sample_pieces(text, piece_bytes)
            seen["documents_cut"] += len(pieces) > 1
            yield from pieces

    piece_bytes = max(4, cfg.tokenizer.sample_bytes // SAMPLE_PIECES)
    # Until the merges are done a signal stops at once (the training child is killed; exit 75);
    # once they are, the caller decides (stage_tokenizer holds it until the tokenizer is published).
    restore = stop_on_signals(lambda signum: f"tokenizer: received signal {signum} before the tokenizer was "
                              f"trained: stopping, nothing is published; the rerun trains it (exit 75)")
    try:
        sample = sample_documents(train_docs(), cfg.tokenizer.sample_bytes, seen)
        if not sample:
            raise DataError(f"no text to train the tokenizer on: {seen['train_documents']} training document(s) "
                            f"read, {seen['heldout_documents']} held out for validation (data.val_permille="
                            f"{cfg.data.val_permille}); the data.* filters or data.on_error=skip removed the rest")
        sampled = time.time()
        logger.info(f"tokenizer: sampled {len(sample)} texts, {sum(len(x.encode()) for x in sample) / 1e6:.1f} MB, "
                    f"from {seen['bytes'] / 1e6:.1f} MB read in {sampled - start:.1f} s; training")
        tok, child_rss = train_in_child(sample, cfg.tokenizer.vocab_size, cfg.tokenizer.max_token_length,
                                        cfg.tokenizer.min_frequency, cfg.tokenizer.pre_tokenizer,
                                        latin_token_bytes(cfg.tokenizer))
    finally:
        restore()
    trained = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, out_dir)
    extra = {"corpus_documents": seen["train_documents"] + seen["heldout_documents"],
             "corpus_train_bytes": seen["bytes"], "documents_sampled_in_pieces": seen["documents_cut"],
             "seconds_sampling": round(sampled - start, 2), "seconds_training": round(trained - sampled, 2),
             "peak_rss_bytes": max(peak_rss_bytes(), child_rss)}  # the merges' memory is the child's
    report = build_report(tok, sample, heldout or sample[:100], time.time() - start, cfg, extra)
    if not heldout:
        report["heldout_note"] = "no held-out documents (data.val_permille): compression measured on training text"
    (out_dir / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return report
