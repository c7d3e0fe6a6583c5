"""Packed token shards: contents, token width, validation split, publish order and reuse (both backends)."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from trainer.config import load_config
from trainer.data.shards import is_validation, prepare_shards
from trainer.data.tokenizer import EOS, train_tokenizer


def shard_tokens(out_dir: Path, index: dict, split: str) -> np.ndarray:
    parts = []
    for entry in index[split]:
        data = (out_dir / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        arr = np.frombuffer(data, dtype=index["dtype"])
        assert len(arr) == entry["tokens"]
        parts.append(arr)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=index["dtype"])


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """Token lists of the documents in a stream where each document ends with eos."""
    assert len(tokens) == 0 or tokens[-1] == eos
    cuts = np.flatnonzero(tokens == eos)
    return [tokens[a + 1 if i else 0: b].tolist() for i, (a, b) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


def data_cfg(**data):
    return load_config(None, {f"data.{k}": v for k, v in {"val_permille": 50, "shard_tokens": 1024, **data}.items()},
                       env={})


class CharTokenizer:
    """One id per character (offset + code point), EOS = 0: a lossless stand-in for the BPE."""

    def __init__(self, vocab_size: int, offset: int = 1):
        self.vocab_size, self.offset = vocab_size, offset

    def token_to_id(self, token):
        return 0 if token == EOS else None

    def get_vocab_size(self):
        return self.vocab_size

    def encode_batch(self, texts, add_special_tokens=False):
        return [SimpleNamespace(ids=[self.offset + ord(c) for c in t]) for t in texts]

    def decode(self, ids):
        return "".join(chr(i - self.offset) for i in ids)


def test_shards_decode_back_to_the_documents(tmp_path, tiny_docs):
    tok = train_tokenizer(tiny_docs, 512, 8, 2)
    eos = tok.token_to_id(EOS)
    cfg = data_cfg()
    index = prepare_shards(cfg, iter(tiny_docs), tok, tmp_path, progress=False)
    assert index["dtype"] == "uint16" and index["eos_id"] == eos and index["vocab_size"] == 512
    assert len(index["train"]) > 3  # shard_tokens=1024 cuts the stream into several files
    assert all(e["tokens"] == 1024 for e in index["train"][:-1])
    expect_val = [d for d in tiny_docs if is_validation(d, 50)]
    expect_train = [d for d in tiny_docs if not is_validation(d, 50)]
    assert 0 < len(expect_val) < 40  # about 5% of 300
    for split, expected in (("train", expect_train), ("val", expect_val)):
        tokens = shard_tokens(tmp_path, index, split)
        assert [tok.decode(ids) for ids in split_docs(tokens, eos)] == expected
        assert index["tokens"][split] == len(tokens)
        assert index["chars"][split] == sum(len(d) + 1 for d in expected)
    assert index["filters"] == {"documents_read": 300, "documents_kept": 300}
    assert json.loads((tmp_path / "index.json").read_text()) == index


@pytest.mark.parametrize("vocab, dtype", [(65536, "uint16"), (65537, "uint32"), (200_000, "uint32")])
def test_token_width_follows_the_vocabulary(tmp_path, vocab, dtype):
    docs = ["床前明月光", "疑是地上霜", "舉頭望明月"]
    tok = CharTokenizer(vocab, offset=vocab - 0xA000)  # ids up to the top of the vocabulary
    index = prepare_shards(data_cfg(val_permille=0), iter(docs), tok, tmp_path, progress=False)
    assert index["dtype"] == dtype
    tokens = shard_tokens(tmp_path, index, "train")
    assert tokens.max() > 0xA000
    assert (tmp_path / "train-00000.bin").stat().st_size == len(tokens) * np.dtype(dtype).itemsize
    assert [tok.decode(ids) for ids in split_docs(tokens, 0)] == docs  # no id was cut to 16 bits


def test_filters_are_applied_and_counted(tmp_path):
    docs = ["短", "長一點的詩句", "長一點的詩句", "ＡＢＣ全角"]
    cfg = data_cfg(val_permille=0, min_chars=2, max_chars=4, nfkc=True)
    index = prepare_shards(cfg, iter(docs), CharTokenizer(65536), tmp_path, progress=False)
    got = [CharTokenizer(65536).decode(ids) for ids in split_docs(shard_tokens(tmp_path, index, "train"), 0)]
    assert got == ["長一點的", "ABC全"]
    assert index["filters"] == {"documents_read": 4, "documents_kept": 2, "removed_too_short": 1,
                                "removed_duplicate": 1, "truncated_too_long": 3}


def val_set(out_dir, docs, tok):
    index = prepare_shards(data_cfg(val_permille=100), iter(docs), tok, out_dir, progress=False)
    return index, {tok.decode(ids) for ids in split_docs(shard_tokens(out_dir, index, "val"), 0)}


def test_validation_split_is_stable_and_order_independent(tmp_path, tiny_docs):
    tok = CharTokenizer(65536)
    index_a, val_a = val_set(tmp_path / "a", tiny_docs, tok)
    index_b, val_b = val_set(tmp_path / "b", tiny_docs, tok)
    _, val_rev = val_set(tmp_path / "rev", tiny_docs[::-1], tok)
    _, val_half = val_set(tmp_path / "half", tiny_docs[::2], tok)
    assert 10 < len(val_a) < 60  # about 10% of 300
    assert index_a["val"] == index_b["val"] and index_a["train"] == index_b["train"]  # same bytes on a rerun
    assert val_rev == val_a  # membership depends on the text alone, not its position
    assert val_half == {d for d in val_a if d in set(tiny_docs[::2])}  # nor on the other documents


# The stages in the bucket (both backends) ------------------------------------------------------

def recording_uploads(monkeypatch, store_cls) -> list[str]:
    keys = []
    real = store_cls.upload_file

    def record(self, local_path, key):
        real(self, local_path, key)
        keys.append(key)

    monkeypatch.setattr(store_cls, "upload_file", record)
    return keys


def forbid(monkeypatch, target: str):
    def fail(*a, **k):
        raise AssertionError(f"{target} was called: the stage should have reused its output")
    monkeypatch.setattr(target, fail)


def test_stages_publish_last_and_reuse(bucket, store, tmp_path, tiny_config, monkeypatch):
    from trainer.job.stages import stage_prepare, stage_tokenizer

    cfg = tiny_config(tmp_path, bucket=bucket)
    with monkeypatch.context() as m:
        uploads = recording_uploads(m, type(store))
        tok_key = stage_tokenizer(cfg)
        arts = stage_prepare(cfg, tokenizer_key=tok_key)
    tok_uploads = [k for k in uploads if k.startswith(tok_key + "/")]
    data_uploads = [k for k in uploads if k.startswith(arts.data_key + "/")]
    assert tok_uploads[-1] == f"{tok_key}/MANIFEST.json" and f"{tok_key}/tokenizer.json" in tok_uploads
    assert data_uploads[-1] == f"{arts.data_key}/index.json"  # the folder counts only once this is there
    index = json.loads(store.read_text(f"{arts.data_key}/index.json"))
    for entry in index["train"] + index["val"]:
        assert store.info(f"{arts.data_key}/{entry['name']}").size == entry["tokens"] * 2
    assert index["tokenizer_key"] == tok_key and index["skipped_records"] == {}

    # A rerun, here or on another machine (fresh scratch), reuses both without recomputing.
    forbid(monkeypatch, "trainer.data.tokenizer.train_from_corpus")
    forbid(monkeypatch, "trainer.data.prepare_pool.prepare_corpus")
    other = tiny_config(tmp_path, {"storage.local_dir": str(tmp_path / "other-machine")}, bucket=bucket)
    for c in (cfg, other):
        assert stage_tokenizer(c) == tok_key
        assert stage_prepare(c) == arts


def test_unfinished_or_changed_prepare_is_redone(bucket, store, tmp_path, tiny_config, monkeypatch):
    from trainer.data import prepare_pool
    from trainer.job.stages import stage_prepare

    calls = []
    real = prepare_pool.prepare_corpus
    monkeypatch.setattr(prepare_pool, "prepare_corpus", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_config(tmp_path, bucket=bucket)
    arts = stage_prepare(cfg)
    store.delete(f"{arts.data_key}/index.json")  # killed before the last upload: shards without an index
    assert stage_prepare(cfg) == arts and len(calls) == 2
    assert store.exists(f"{arts.data_key}/index.json")
    # A setting that changes the tokens gets its own folder (and leaves the first one alone).
    changed = stage_prepare(tiny_config(tmp_path, {"data.val_permille": 100}, bucket=bucket))
    assert changed.data_key != arts.data_key and len(calls) == 3
    # Other validation documents: the tokenizer is retrained without them (no leak into val loss).
    assert changed.tokenizer_key != arts.tokenizer_key
    assert store.exists(f"{arts.data_key}/index.json")


def test_long_documents_encode_in_pieces_to_the_same_tokens(tmp_path, tiny_docs, monkeypatch):
    """A document past LONG_DOC_CHARS is cut after line breaks and its pieces encoded in one batch
    (on every core); the tokens written are exactly those of encoding the whole document."""
    import trainer.data.shards as prepare

    monkeypatch.setattr(prepare, "LONG_DOC_CHARS", 2_000)
    monkeypatch.setattr(prepare, "PIECE_CHARS", 500)
    tok = train_tokenizer(tiny_docs, 512, 8, 2)
    eos = tok.token_to_id(EOS)
    long_doc = "\n\n".join(tiny_docs[:200]) + "\n  indented line, spaces kept\n\t\nabc 123\n"
    assert len(long_doc) > 5 * 2_000 and len(prepare.line_pieces(long_doc, 500)) > 5
    assert "".join(prepare.line_pieces(long_doc, 500)) == long_doc
    docs = [long_doc, tiny_docs[100], long_doc[:1_500]]  # one long, two short in the same batch
    index = prepare_shards(data_cfg(val_permille=0, dedup=False), iter(docs), tok, tmp_path, progress=False)
    got = split_docs(shard_tokens(tmp_path, index, "train"), eos)
    assert got == [tok.encode(d, add_special_tokens=False).ids for d in docs]


def test_line_pieces_cut_only_after_a_newline_before_text():
    from trainer.data.shards import line_pieces

    text = "a" * 10 + "\n" + "b" * 10 + "\n\n" + "c" * 10
    assert line_pieces(text, 5) == ["a" * 10 + "\n", "b" * 10 + "\n\n", "c" * 10]
    assert line_pieces("x" * 50, 5) == ["x" * 50]  # no line break: one piece
    assert line_pieces("short", 100) == ["short"]
