"""The tokenizer: special tokens and chat template through AutoTokenizer, the Chinese-aware
pre-tokenization and its length bounds, the bounded sample, the hash, normalisation, token width.
Every tokenizer here is trained inside the test on a few thousand poems (well under a second each)."""

import dataclasses
import json
import logging
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import read_sample_docs
from trainer.config import load_config
from trainer.data.shards import Normalizer, SeenHashes, data_hash, prepare_shards, token_dtype
from trainer.data.token_length import cap_han_tokens, han_characters
from trainer.data.tokenizer import (
    EOS,
    IM_END,
    IM_START,
    LLAMA_CPP_PRE,
    PAD,
    SPECIAL_TOKENS,
    build_pretokenizer,
    chars_per_token,
    doc_hash,
    han_chunk_chars,
    llama_cpp_pre_name,
    load_tokenizer,
    log_progress,
    sample_documents,
    save_tokenizer,
    token_strings,
    tokenizer_hash,
    train_from_corpus,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def poems() -> list[str]:
    return read_sample_docs(3000)  # ~240k characters


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, poems):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(poems, 1024, 4), out)
    return out


def cfg_with(**overrides):
    return load_config(None, overrides, env={})


def han_tokens(tok) -> list[str]:
    return [w for w in token_strings(tok) if w and all("\u4e00" <= c <= "\u9fff" for c in w)]


# Special tokens, chat template, loading --------------------------------------------------------

def test_special_tokens_and_chat_template_through_autotokenizer(tok_dir):
    tok = load_tokenizer(tok_dir)  # AutoTokenizer.from_pretrained(dir)
    assert [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.eos_token, tok.pad_token, tok.eos_token_id, tok.pad_token_id) == (EOS, PAD, 0, 1)
    assert tok.bos_token is None  # documents are separated by EOS only
    messages = [{"role": "system", "content": "你是詩人。"}, {"role": "user", "content": "寫一首詩"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\n你是詩人。<|im_end|>\n<|im_start|>user\n寫一首詩<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3 and ids.count(tok.convert_tokens_to_ids(IM_END)) == 2
    assert tok.decode(ids) == text


def test_round_trip_of_mixed_text(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "床前明月光，疑是地上霜。\nHello, world! 2026年11月28日 ½ 🙂\t  end\n\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("vocab", [300, 2048, 4096])
def test_vocab_size_is_what_was_asked(poems, vocab):
    tok = train_tokenizer(poems, vocab, 4)
    assert tok.get_vocab_size() == vocab
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3]


# Pre-tokenization and token length -------------------------------------------------------------

def test_digits_are_split_singly(poems):
    docs = poems[:500] + [f"第{n}首，共{n * 7}字。" for n in range(100, 400)] * 3
    tok = train_tokenizer(docs, 1024, 4)
    enc = tok.encode("2026年第123首")
    pieces = [tok.decode([i]) for i in enc.ids]
    digit_tokens = [p for p in pieces if any(c in "0123456789" for c in p)]
    assert digit_tokens == list("2026123")  # ...though "123" is frequent in the training text


def test_han_tokens_stop_at_max_token_length(poems):
    phrase = "春眠不覺曉處處聞啼鳥"  # ten characters, repeated far more often than anything else
    tok = train_tokenizer(poems[:1000] + [phrase] * 200, 2048, 3)
    lengths = Counter(len(w) for w in han_tokens(tok))
    assert max(lengths) == 3  # never longer, and the bound itself is reached (trainer limit is exclusive)
    pre = build_pretokenizer(han_chunk_chars(3))
    pieces = [p for p, _ in pre.pre_tokenize_str("一二三四五六七八九十" * 3)]
    assert len(pieces) == 3 and all(len(p) == 3 * 12 for p in pieces[:2])  # 12 characters of 3 bytes each


def test_pretokenizer_separates_scripts_and_keeps_newline_with_punctuation():
    from tokenizers import decoders

    pre = build_pretokenizer(16)
    dec = decoders.ByteLevel()
    pieces = [dec.decode([p]) for p, _ in pre.pre_tokenize_str("明月光。\nGPT-4 模型2026")]
    assert pieces == ["明月光", "。\n", "GPT", "-", "4", " ", "模型", "2", "0", "2", "6"]


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_PRE))
def test_each_pre_tokenizer_trains_round_trips_and_is_named_for_llama_cpp(tmp_path, poems, pre):
    text = "床前明月光，疑是地上霜。\nHello, it's 2026年11月30日 🙂\t end\n\n"
    save_tokenizer(train_tokenizer(poems[:1000], 1024, 4, pre_tokenizer=pre), tmp_path)
    tok = load_tokenizer(tmp_path)  # as an export reloads it
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3]
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert llama_cpp_pre_name(saved) == LLAMA_CPP_PRE[pre]  # None for zh: llama.cpp has no such split
    assert max(len(w) for w in han_tokens(tok)) <= 4  # max_token_length holds whatever the split


def test_latin_words_and_indentation_pass_12_bytes_while_han_stays_capped(tmp_path, poems):
    """max_latin_token_bytes: a frequent 20-letter word and 16 spaces of indentation become one token
    each, which the old single cap (12 bytes for max_token_length 4) cuts; no token holds more than
    4 Han characters (a frequent 10-character line is cut), and the result is a stock tokenizer.json."""
    code = "def f(x):\n                return internationalization(x)\n"
    lines = [f"第{i}行 internationalization 與 " + code for i in range(300)]
    docs = poems[:1000] + ["春眠不覺曉處處聞啼鳥"] * 200 + lines
    capped = train_tokenizer(docs, 2048, 4, pre_tokenizer="qwen2", max_latin_bytes=24)
    old = train_tokenizer(docs, 2048, 4, pre_tokenizer="qwen2")
    pieces = lambda tok, text: [tok.decode([i]) for i in tok.encode(text).ids]  # noqa: E731
    assert pieces(capped, " internationalization") == [" internationalization"]
    assert len(pieces(old, " internationalization")) > 1
    assert " " * 15 in pieces(capped, code) and not any(" " * 12 in p for p in pieces(old, code))
    assert capped.get_vocab_size() == 2048
    assert max(han_characters(t) for t in capped.get_vocab()) == 4  # reached, never passed
    assert len(pieces(capped, "春眠不覺曉處處聞啼鳥")) >= 3
    save_tokenizer(capped, tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "床前明月光，疑是地上霜。\n" + code
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert llama_cpp_pre_name(json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))) == "qwen2"


def test_cap_han_tokens_drops_long_han_merges_and_what_builds_on_them(poems):
    trained = train_tokenizer(poems[:1000] + ["春眠不覺曉處處聞啼鳥"] * 200, 1500, 8, pre_tokenizer="qwen2")
    capped_json, dropped = cap_han_tokens(trained.to_str(), 2, 1500)
    model = json.loads(capped_json)["model"]
    vocab, merges = model["vocab"], model["merges"]
    assert dropped > 0 and max(han_characters(t) for t in vocab) == 2
    assert sorted(vocab.values()) == list(range(len(vocab)))  # ids stay dense
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    assert [vocab[s] for s in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert len(vocab) < 1500  # nothing to fill the room with: the trainer was asked for 1500 only


def test_hash_of_the_han_only_cap_leaves_old_keys_alone():
    """The default (qwen2, max_latin_token_bytes 24, 2026-12-03) is another tokenizer than before;
    max_latin_token_bytes=0 gives the hash (and tokenizer) of the qwen2 default of 2026-11-30, and
    zh ignores the setting, so runs started before resume with their tokenizer."""
    before = "554da7d935f46b85"  # tokenizer_hash(cfg_with(), "fp") at commit 8f8bc0c
    assert tokenizer_hash(cfg_with(**{"tokenizer.max_latin_token_bytes": 0}), "fp") == before
    assert tokenizer_hash(cfg_with(), "fp") != before
    assert tokenizer_hash(cfg_with(**{"tokenizer.max_latin_token_bytes": 32}), "fp") not in (
        before, tokenizer_hash(cfg_with(), "fp"))
    for latin in (0, 24, 32):
        zh = cfg_with(**{"tokenizer.pre_tokenizer": "zh", "tokenizer.max_latin_token_bytes": latin})
        assert tokenizer_hash(zh, "fp") == "6029e65ef9b1a8ca"


def test_llama_cpp_pre_tokenizers_split_as_their_models_do():
    from tokenizers import decoders

    dec = decoders.ByteLevel()

    def split(kind, text):
        return [dec.decode([p]) for p, _ in build_pretokenizer(16, kind).pre_tokenize_str(text)]

    text = "床前明月光，疑是地上霜。\nIt's 2026"
    # Qwen2: Han runs whole, a punctuation mark joins the letters after it, digits singly
    assert split("qwen2", text) == ["床前明月光", "，疑是地上霜", "。\n", "It", "'s", " ", "2", "0", "2", "6"]
    # DeepSeek LLM: newlines alone, punctuation runs, CJK runs, digit runs
    assert split("deepseek-llm", text) == ["床前明月光", "，", "疑是地上霜", "。", "\n", "It", "'", "s", " ", "2026"]
    assert split("gpt-2", text) == ["床前明月光", "，", "疑是地上霜", "。", "\n", "It", "'s", " 2026"]
    assert llama_cpp_pre_name({"pre_tokenizer": None}) is None
    with pytest.raises(ValueError, match="unknown pre-tokenizer"):
        build_pretokenizer(16, "llama3")


# The sample ------------------------------------------------------------------------------------

def synthetic_files(n_files=4, n_docs=500):
    rng = random.Random(0)
    return [[f"file{f} doc{i} " + "字" * rng.randint(10, 200) for i in range(n_docs)] for f in range(n_files)]


def test_sample_is_bounded_deterministic_nested_and_even_across_files():
    files = synthetic_files()
    docs = [d for f in files for d in f]
    cap = sum(len(d.encode()) for d in docs) // 5
    seen = Counter()
    sample = sample_documents(iter(docs), cap, seen)
    assert cap - 1000 < sum(len(d.encode()) for d in sample) <= cap  # filled up to the last document that fits
    assert seen == Counter(documents=len(docs), bytes=sum(len(d.encode()) for d in docs))
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert sample_documents(iter(shuffled), cap) == sample  # order of files and documents does not matter
    assert set(sample_documents(iter(docs), cap // 2)) <= set(sample)  # a smaller cap keeps a subset
    per_file = Counter(d.split()[0] for d in sample)
    assert len(per_file) == 4 and max(per_file.values()) < 1.5 * min(per_file.values())  # ~1/4 each, no file skipped
    assert sample_documents(iter(docs), 10) == []  # every document is larger than the cap


def test_train_from_corpus_writes_report_and_holds_out(tmp_path, poems):
    cfg = cfg_with(**{"tokenizer.vocab_size": 1024, "tokenizer.max_token_length": 4, "tokenizer.sample_bytes": 300_000})
    is_heldout = lambda t: doc_hash(t) % 10 == 0  # noqa: E731
    report = train_from_corpus(cfg, iter(poems), tmp_path, is_heldout)
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == report
    assert report["vocab_size"] == 1024 and report["han_chunk_chars"] == 16
    assert report["heldout_documents"] == sum(map(is_heldout, poems))
    assert report["corpus_documents"] == len(poems)
    assert report["sample_bytes"] <= 300_000 < report["corpus_train_bytes"]
    heldout = [p for p in poems if is_heldout(p)]
    assert report["chars_per_token_heldout"] == round(chars_per_token(load_tokenizer(tmp_path), heldout), 4)
    han = [w for w in report["longest_tokens"] if "\u4e00" <= w[0] <= "\u9fff"]
    assert len(report["longest_tokens"]) == 20 and han and all(len(w) <= 4 for w in han)
    assert report["peak_rss_bytes"] > 10_000_000 and report["seconds"] > 0
    assert sum(report["token_length_histogram"].values()) == 1024 - len(SPECIAL_TOKENS)
    assert load_tokenizer(tmp_path).eos_token == EOS


def test_hash_follows_every_setting_that_changes_the_tokenizer():
    base = cfg_with()
    h = tokenizer_hash(base, "corpus-a")
    assert tokenizer_hash(cfg_with(), "corpus-a") == h
    assert tokenizer_hash(cfg_with(**{"train.lr": 0.5, "data.dedup": False}), "corpus-a") == h  # not inputs
    assert tokenizer_hash(base, "corpus-b") != h
    changed = {"tokenizer.vocab_size": 8000, "tokenizer.max_token_length": 3, "tokenizer.min_frequency": 5,
               "tokenizer.sample_bytes": 1234567, "data.nfkc": True, "data.to_simplified": True,
               "data.min_chars": 5, "data.max_chars": 100, "data.val_permille": 20, "data.text_field": "content"}
    hashes = {tokenizer_hash(cfg_with(**{k: v}), "corpus-a") for k, v in changed.items()}
    assert len(hashes) == len(changed) and h not in hashes
    assert data_hash(base, "c", "tok") != data_hash(cfg_with(**{"data.dedup": False}), "c", "tok")
    assert tokenizer_hash(cfg_with(**{"tokenizer.pre_tokenizer": "zh"}), "corpus-a") not in hashes | {h}


def test_zh_tokenizers_hash_and_train_as_before_the_default_changed():
    """tokenizer.pre_tokenizer=zh (the default until 2026-11-30) gives the hash a run reuses its
    tokenizer by and the tokenizer.json it trained before the key existed (commit deafe08), so a
    run that sets it keeps its tokenizer; the new default (qwen2) is another tokenizer."""
    zh = cfg_with(**{"tokenizer.pre_tokenizer": "zh"})
    assert tokenizer_hash(zh, "fp") == "6029e65ef9b1a8ca" != tokenizer_hash(cfg_with(), "fp")
    pre = json.loads(train_tokenizer(["床前明月光"] * 3, 300, 4, pre_tokenizer="zh").to_str())["pre_tokenizer"]
    assert [p.get("pattern", {}).get("Regex") for p in pre["pretokenizers"]] == [
        r"\p{Han}{1,16}| ?[\p{L}\p{M}&&[^\p{Han}]]{1,32}|\p{N}| ?[^\s\p{L}\p{N}]{1,16}[\r\n]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+", None]


def test_a_saved_zh_tokenizer_loads_and_encodes_as_it_did(tmp_path, poems):
    """A tokenizer folder saved before the default changed is self-describing: loading it gives its
    own split and ids, whatever tokenizer.pre_tokenizer now defaults to."""
    text = "床前明月光，疑是地上霜。\nHello 2026"
    trained = train_tokenizer(poems[:500], 600, 4, pre_tokenizer="zh")
    save_tokenizer(trained, tmp_path)
    assert load_tokenizer(tmp_path)(text, add_special_tokens=False)["input_ids"] == trained.encode(text).ids
    assert llama_cpp_pre_name(json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))) is None


def test_training_logs_readable_progress(caplog, poems, monkeypatch):
    caplog.set_level(logging.INFO, logger="trainer")
    clock = iter(range(0, 10_000, 20))  # 20 s per document read
    monkeypatch.setattr("trainer.data.tokenizer.time", SimpleNamespace(time=lambda: float(next(clock))))
    assert list(log_progress(["春眠", "不覺曉", "處處"], start=0.0, every_seconds=30)) == ["春眠", "不覺曉", "處處"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["tokenizer: reading the corpus, 2 documents, 0.0 M characters (0.0 M/s)"]
    monkeypatch.undo()
    caplog.clear()
    train_tokenizer(poems[:200], 400, 4)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("tokenizer: counted the words of 200 texts in ")
    assert lines[0].endswith("merging to 400 tokens") and lines[1].startswith("tokenizer: 400 tokens trained in ")


# Normalisation ---------------------------------------------------------------------------------

def test_normalisation_filters_and_counts():
    cfg = cfg_with(**{"data.nfkc": True, "data.to_simplified": True, "data.min_chars": 3, "data.max_chars": 6})
    docs = ["歷史與傳統", "ＡＢＣ１２３", "短", "歷史與傳統", "历史与传统", "漢字很長很長很長很長"]
    norm = Normalizer(cfg.data)
    assert list(norm(iter(docs))) == ["历史与传统", "ABC123", "汉字很长很长"]
    assert norm.counts == Counter(documents_read=6, documents_kept=3, removed_too_short=1, removed_duplicate=2,
                                  truncated_too_long=1)  # the two traditional copies dedup after conversion
    plain = Normalizer(dataclasses.replace(cfg.data, nfkc=False, to_simplified=False, dedup=False, min_chars=1,
                                           max_chars=0))
    assert list(plain(iter(docs))) == docs and plain.counts == Counter(documents_read=6, documents_kept=6)


def test_dedup_set_is_exact_across_merges():
    seen = SeenHashes()
    rng = np.random.default_rng(0)
    first = rng.integers(0, 2**63, 70_000, dtype=np.uint64).tolist() + [2**64 - 1]
    assert all(seen.add_batch(first))  # more than 65536: merged into the sorted array
    assert len(seen._recent) == 0 and len(seen) == len(first)
    again = first[::1000] + [5, 5, 2**64 - 1]
    assert seen.add_batch(again) == [False] * (len(again) - 3) + [True, False, False]


# Token width and special-token text in documents ------------------------------------------------

def big_vocab_tokenizer(n_filler: int):
    """A real byte-level BPE with n_filler unused tokens and one merge ("月光") whose id is the last,
    returned with that id: built directly, since training a 65k+ vocabulary would take minutes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(alphabet) + [f"filler{i}" for i in range(n_filler)])}
    moon, light = (pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(c)[0][0] for c in "月光")
    merges = [(moon[0], moon[1]), (moon[:2], moon[2]), (light[0], light[1]), (light[:2], light[2])]
    for a, b in merges + [(moon, light)]:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges + [(moon, light)]))
    tok.pre_tokenizer = build_pretokenizer(16)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok, vocab[moon + light]


@pytest.mark.parametrize("n_filler, dtype", [(1000, "uint16"), (70_000, "uint32")])
def test_token_width_follows_the_vocabulary(tmp_path, n_filler, dtype):
    tok, moonlight = big_vocab_tokenizer(n_filler)
    assert moonlight == tok.get_vocab_size() - 1
    cfg = cfg_with(**{"data.val_permille": 0})
    index = prepare_shards(cfg, iter(["床前明月光", "月光"]), tok, tmp_path, progress=False)
    assert index["dtype"] == dtype == token_dtype(tok.get_vocab_size()).name
    ids = np.fromfile(tmp_path / "train-00000.bin", dtype=dtype)
    assert ids.tolist().count(moonlight) == 2 and ids[-1] == 0  # the id past 65535 kept its value
    assert tok.decode([int(i) for i in ids if i != 0]) == "床前明月光月光"


def test_token_dtype_boundary():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_special_token_text_inside_a_document_is_not_a_separator(tmp_path, tok_dir):
    docs = ["這篇文章提到 <|endoftext|> 與 <|im_start|> 字樣", "第二篇"]
    index = prepare_shards(cfg_with(**{"data.val_permille": 0}), iter(docs), load_tokenizer(tok_dir), tmp_path,
                           progress=False)
    ids = np.fromfile(tmp_path / "train-00000.bin", dtype=index["dtype"]).tolist()
    assert ids.count(0) == 2 and ids[-1] == 0 and 2 not in ids  # EOS only as the two separators
    assert load_tokenizer(tok_dir).decode(ids[: ids.index(0)]) == docs[0]
