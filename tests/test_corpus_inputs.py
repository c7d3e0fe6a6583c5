"""The corpora people actually have (issue 13, "Corpus discovery and reading"): folders with mixed-case
and aliased file names, paths holding glob characters, invalid Unicode, .json arrays, byte-order marks
and CRLF line ends, one long document, a corpus too small to train on, a LLaMA-style tokenizer.

Each test holds the case the issue reports and a sibling of the same kind. Everything runs on CPU in
a few seconds; tokenizers are built inside the tests (no downloads).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
from pathlib import Path

import numpy as np
import pytest
import zstandard

from trainer.config import ConfigError, load_config
from trainer.data.readers import DocumentReader, iter_documents, iter_json_array
from trainer.data.shards import check_trainable, prepare_shards
from trainer.data.sources import DataError, file_kind, local_files, resolve_sources
from trainer.data.tokenizer import EOS, load_tokenizer, sample_pieces, train_from_corpus


def jsonl(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d}, ensure_ascii=False) + "\n" for d in docs).encode()


def cfg(**overrides):
    return load_config(None, overrides, env={})


def read(path: Path, **data) -> tuple[list[str], dict]:
    reader = DocumentReader(cfg(**{f"data.{k}": v for k, v in data.items()}).data)
    return list(reader.iter_file(local_files([path])[0])), dict(reader.skipped)


def names(*sources: str, **overrides) -> list[str]:
    return [f.url.rsplit("/", 1)[-1] for f in resolve_sources(cfg(**{"data.sources": list(sources), **overrides}))]


def cli(capsys, *args: str) -> tuple[int, str]:
    import entrypoint

    with pytest.raises(SystemExit) as e:
        entrypoint.main(list(args))
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


def cli_settings(tmp_path: Path) -> list[str]:
    return [f"--storage.bucket={tmp_path / 'bucket'}", f"--storage.local_dir={tmp_path / 'work'}",
            "--tokenizer.vocab_size=300", "--tokenizer.sample_bytes=20000"]


# 1. Folder sources: every corpus file, whatever the letter case or alias; skipped files are logged ------

COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress,
            ".zstd": zstandard.ZstdCompressor().compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def mixed_folder(folder: Path, per_file: int = 100) -> list[str]:
    """The issue's folder (part-000.jsonl, part-001.JSONL, part-002.jsonl.zstd) plus other spellings
    of the same kind; returns every document the folder holds."""
    names = ["part-000.jsonl", "part-001.JSONL", "part-002.jsonl.zstd", "part-003.ndjson", "part-004.Jsonl.GZ",
             "part-005.jsonl.bz2", "part-006.jsonl.xz", "part-007.TXT", "part-008.json.zst"]
    folder.mkdir(parents=True, exist_ok=True)
    everything = []
    for n, name in enumerate(names):
        docs = [f"第{n}卷第{i}首 床前明月光" for i in range(per_file)]
        raw = ("\n\n".join(docs) + "\n").encode() if ".txt" in name.lower() else jsonl(docs)
        ext = next(e for e in (".zstd", ".zst", ".gz", ".bz2", ".xz", "") if name.lower().endswith(e))
        (folder / name).write_bytes(COMPRESS[ext](raw))
        everything += docs
    return everything


def test_a_folder_reads_every_corpus_file_whatever_its_case_or_alias(tmp_path, caplog):
    folder = tmp_path / "corpus"
    expected = mixed_folder(folder)
    (folder / "README.md").write_text("notes", encoding="utf-8")
    (folder / "part-009.jsonl.lz4").write_bytes(b"\x04\x22\x4d\x18")  # a compression we do not read
    (folder / ".part-000.jsonl.123.456.part").write_bytes(b"half")  # a download in progress
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.jsonl").write_bytes(jsonl(["cached"]))
    c = cfg(**{"data.sources": [str(folder)]})
    with caplog.at_level(logging.WARNING, logger="trainer"):
        files = resolve_sources(c)
    assert len(files) == 9
    assert sorted(iter_documents(c.data, files)) == sorted(expected)  # 900 of 900 documents, not 100
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("trainer")]
    assert "data.sources[0]" in warning and "read 9 file(s), skipped 4" in warning
    for skipped in ("README.md (not a corpus file type)", "part-009.jsonl.lz4 (not a corpus file type)",
                    ".part-000.jsonl.123.456.part (hidden)", ".cache/x.jsonl (hidden)"):
        assert skipped in warning


def test_an_s3_folder_matches_names_case_insensitively_too(store, bucket, caplog):
    for name in ("c/part-000.jsonl", "c/part-001.JSONL", "c/part-002.jsonl.zstd", "c/notes.md"):
        store.write_bytes(name, b'{"text": "x"}\n')
    overrides = {"storage.endpoint_url": bucket.endpoint_url}
    with caplog.at_level(logging.WARNING, logger="trainer"):
        got = names(store.url("c"), **overrides)
    assert got == ["part-000.jsonl", "part-001.JSONL", "part-002.jsonl.zstd"]
    assert any("notes.md (not a corpus file type)" in r.getMessage() for r in caplog.records)


def test_file_kinds():
    assert file_kind("part-001.JSONL") == ("jsonl", "")
    assert file_kind("a.jsonl.zstd") == file_kind("a.jsonl.zst") == ("jsonl", "zst")
    assert file_kind("a.ndjson.gz") == ("jsonl", "gz")
    assert file_kind("a.json.gz") == ("json", "gz")  # .json.gz: a common export, and datasets reads it
    assert file_kind("a.TXT.XZ") == ("txt", "xz")
    assert file_kind("a.parquet") == ("parquet", "")
    assert file_kind("a.parquet.gz") is None  # parquet compresses inside; a compressed one cannot be read
    assert file_kind("README.md") is file_kind("a.jsonl.lz4") is file_kind("jsonl") is None


def test_a_named_file_of_another_type_says_why_nothing_matched(tmp_path):
    (tmp_path / "a.jsonl.lz4").write_bytes(b"x")
    with pytest.raises(DataError, match=r"data\.sources\[0\]: .* matches no corpus file .*"
                                        r"skipped a\.jsonl\.lz4 \(not a corpus file type\)"):
        resolve_sources(cfg(**{"data.sources": [str(tmp_path / "a.jsonl.lz4")]}))
    (tmp_path / "notes.md").write_text("# notes", encoding="utf-8")  # eval --text reads files it is given
    with pytest.raises(DataError, match=r"notes\.md: not a corpus file type \(supported: \.jsonl"):
        read(tmp_path / "notes.md")


# 2. A path that exists is taken literally, glob characters and all ---------------------------------------

def test_an_existing_folder_with_glob_characters_is_taken_literally(tmp_path):
    folder = tmp_path / "中文 语料 [清洗后]"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(jsonl(["一"]))
    (folder / "b.jsonl").write_bytes(jsonl(["二"]))
    assert names(str(folder)) == ["a.jsonl", "b.jsonl"]
    assert names(str(folder) + "/") == ["a.jsonl", "b.jsonl"]
    assert names(str(folder / "*.jsonl")) == ["a.jsonl", "b.jsonl"]  # a glob inside it
    assert names(str(folder / "a.jsonl")) == ["a.jsonl"]


def test_an_existing_file_with_glob_characters_is_taken_literally(tmp_path):
    (tmp_path / "poems[1].jsonl").write_bytes(jsonl(["一"]))
    (tmp_path / "poems1.jsonl").write_bytes(jsonl(["二"]))  # what the glob poems[1].jsonl would match
    assert names(str(tmp_path / "poems[1].jsonl")) == ["poems[1].jsonl"]
    assert names(str(tmp_path / "poems?.jsonl")) == ["poems1.jsonl"]  # a real glob still works


def test_an_s3_prefix_with_glob_characters_is_taken_literally(store, bucket):
    store.write_bytes("语料 [v2]/a.jsonl", jsonl(["一"]))
    store.write_bytes("语料 [v2]/b[1].jsonl", jsonl(["二"]))
    store.write_bytes("语料 2/c.jsonl", jsonl(["三"]))  # what the glob '语料 [v2]' would match
    overrides = {"storage.endpoint_url": bucket.endpoint_url}
    assert names(store.url("语料 [v2]"), **overrides) == ["a.jsonl", "b[1].jsonl"]
    assert names(store.url("语料 [v2]/b[1].jsonl"), **overrides) == ["b[1].jsonl"]


# 3. Invalid Unicode is a bad record: named by file and line, skipped and counted under skip ------------

SURROGATE_LINES = (b'{"text": "good 1"}\n'
                   b'{"text": "broken emoji \\ud83d here"}\n'  # the issue's case: an unpaired surrogate escape
                   b'{"text": "a pair \\ud83d\\ude00 is fine"}\n'
                   b'{"text": "raw surrogate bytes \xed\xa0\xbd"}\n'  # the same, as (CESU-8) bytes
                   b'{"text": "good 2"}\n')


def test_an_unpaired_surrogate_is_a_bad_record(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(SURROGATE_LINES)
    with pytest.raises(DataError, match=r"s\.jsonl:2: invalid Unicode: an unpaired surrogate escape \(U\+D83D\)"):
        read(path)
    docs, skipped = read(path, on_error="skip")
    assert docs == ["good 1", "a pair \U0001F600 is fine", "good 2"]
    assert skipped == {"invalid Unicode": 1, "invalid UTF-8": 1}
    for d in docs:
        d.encode("utf-8")  # what the tokenizer does


def test_tokenizer_stage_skips_invalid_unicode_instead_of_crashing(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_bytes(SURROGATE_LINES + jsonl([f"第{i}首 床前明月光，疑是地上霜。" for i in range(200)]))
    code, err = cli(capsys, "tokenizer", f"--data.sources={path}", *cli_settings(tmp_path))
    assert code == 2 and f"error: {path}:2: invalid Unicode" in err and "Traceback" not in err
    code, err = cli(capsys, "tokenizer", f"--data.sources={path}", "--data.on_error=skip", *cli_settings(tmp_path))
    assert code == 0, err
    (report,) = (tmp_path / "work" / "tokenizers").glob("*/report.json")
    assert json.loads(report.read_text())["skipped_records"] == {"invalid Unicode": 1, "invalid UTF-8": 1}


def test_invalid_utf8_in_parquet_is_one_bad_row_not_an_unreadable_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = pa.array([b"good 1", b"caf\xe9 \xff", b"good 2"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": cells}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet:row 2: 'text' holds bytes that are not UTF-8"):
        read(tmp_path / "p.parquet")
    assert read(tmp_path / "p.parquet", on_error="skip") == (["good 1", "good 2"], {"invalid UTF-8": 1})


def test_invalid_unicode_in_a_json_array_is_one_bad_record(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"text": "good 1"},\n {"text": "\\udc00 lone"},\n {"text": "caf\xe9"},\n {"text": "good 2"}]')
    with pytest.raises(DataError, match=r"a\.json:2 \(array index 1\): invalid Unicode"):
        read(path)
    assert read(path, on_error="skip") == (["good 1", "good 2"], {"invalid Unicode": 1, "invalid UTF-8": 1})


def test_invalid_utf8_in_text_is_still_a_bad_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("春眠不覺曉\n".encode() + b"\xff broken\n\n" + "處處聞啼鳥\n".encode())
    assert read(path, on_error="skip") == (["春眠不覺曉", "處處聞啼鳥"], {"invalid UTF-8": 1})


# 4. A .json file holding one array of records -------------------------------------------------------------

RECORDS = [{"text": f"第{i}首", "id": i} for i in range(50)]


@pytest.mark.parametrize("indent", [None, 2], ids=["compact", "pretty"])
@pytest.mark.parametrize("name", ["a.json", "a.json.gz", "A.JSON"])
def test_a_json_array_is_read_as_records(tmp_path, indent, name):
    data = json.dumps(RECORDS, ensure_ascii=False, indent=indent).encode()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert read(tmp_path / name) == ([r["text"] for r in RECORDS], {})


def test_json_lines_in_a_json_file_still_read(tmp_path):
    (tmp_path / "l.json").write_bytes(jsonl(["一", "二"]))
    assert read(tmp_path / "l.json") == (["一", "二"], {})


def test_bad_records_in_a_json_array_are_named_by_index(tmp_path):
    path = tmp_path / "a.json"
    records = [{"text": "good 1"}, {"body": "no text"}, {"text": 5}, ["a list"], {"text": "good 2"}]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:5 \(array index 1\): record has no 'text' field"):
        read(path)
    assert read(path, on_error="skip") == (["good 1", "good 2"],
                                           {"missing text field": 2, "non-string text": 1})


def test_a_broken_json_array_keeps_the_records_before_the_break(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(RECORDS, indent=1)[:-300], encoding="utf-8")  # cut inside the array
    with pytest.raises(DataError, match=r"cut\.json:\d+: invalid JSON array: .*the rest of the file is not read"):
        read(path)
    docs, skipped = read(path, on_error="skip")
    assert 30 < len(docs) < 50 and docs == [r["text"] for r in RECORDS[:len(docs)]]
    assert skipped == {"invalid JSON": 1}
    (tmp_path / "obj.json").write_text('{\n "text": "one pretty object"\n}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"obj\.json:1: invalid JSON: .*one JSON array of records"):
        read(tmp_path / "obj.json")


def test_json_array_streams_across_any_buffer_boundary():
    records = [{"text": "字" * i, "n": [i, {"k": "v\\\"]"}]} for i in range(60)]
    text = json.dumps(records, ensure_ascii=False, indent=1)
    for chunk in (1, 7, 64, 1 << 20):
        got = list(iter_json_array(io.StringIO(text), chunk_chars=chunk))
        assert [v for _, _, v, _ in got] == records
        assert [i for _, i, _, _ in got] == list(range(60))
        lines = [line for line, _, _, _ in got]
        assert lines[0] == 2 and lines == sorted(lines)  # the line each element starts on


# 5. Byte-order marks and CRLF / CR line ends, in every reader ---------------------------------------------

def test_txt_with_bom_and_crlf(tmp_path):
    (tmp_path / "w.txt").write_bytes("\ufeff床前明月光，\r\n疑是地上霜。\r\n\r\n舉頭望明月\r\n".encode())
    assert read(tmp_path / "w.txt") == (["床前明月光，\n疑是地上霜。", "舉頭望明月"], {})
    (tmp_path / "mac.txt").write_bytes("一\r二\r\r三\r".encode())  # old Mac line ends
    assert read(tmp_path / "mac.txt") == (["一\n二", "三"], {})


def test_jsonl_json_and_parquet_with_bom_and_crlf(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["第一行\r\n第二行", "old\rmac", "\ufeff開頭"]
    want = ["第一行\n第二行", "old\nmac", "開頭"]
    (tmp_path / "w.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(docs).replace(b"\n", b"\r\n"))
    (tmp_path / "w.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": d} for d in docs], indent=1)
                                      .replace("\n", "\r\n").encode())
    pq.write_table(pa.table({"text": docs}), tmp_path / "w.parquet")
    for name in ("w.jsonl", "w.json", "w.parquet"):
        assert read(tmp_path / name) == (want, {}), name


# 6. One long document still trains a tokenizer ----------------------------------------------------------

def novel(lines: int, newline: str = "\n") -> str:
    return "".join(f"第{i}回 滾滾長江東逝水，浪花淘盡英雄。是非成敗轉頭空。{newline}" for i in range(lines))


@pytest.mark.parametrize("newline", ["\n", ""], ids=["lines", "one-line"])
def test_one_long_document_trains_a_tokenizer(tmp_path, newline):
    text = novel(5100, newline)  # over 400 KB, no blank line: one document
    assert len(text.encode()) > 400_000
    c = cfg(**{"tokenizer.vocab_size": 400, "tokenizer.sample_bytes": 200_000})
    report = train_from_corpus(c, iter([text]), tmp_path / "tok", lambda t: False)
    assert report["vocab_size"] > 300 and report["documents_sampled_in_pieces"] == 1  # merges were learned
    assert 150_000 < report["sample_bytes"] <= 200_000 and report["corpus_documents"] == 1
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.decode(tok.encode("是非成敗")) == "是非成敗"


def test_sample_pieces_cut_after_line_breaks_or_between_characters():
    text = novel(300)
    pieces = sample_pieces(text, 4000)
    assert "".join(pieces) == text and all(len(p.encode()) <= 4000 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])
    mixed = "a" + "好😀" * 3000  # 1-, 3- and 4-byte characters, no line break
    pieces = sample_pieces(mixed, 1001)
    assert "".join(pieces) == mixed and all(len(p.encode()) <= 1001 for p in pieces) and len(pieces) > 20
    assert sample_pieces("短", 4) == ["短"]


# 7. Nothing to train on: exit 2 with the counts, before torchrun -----------------------------------------

def test_every_record_skipped_is_a_data_error_with_the_counts(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'not json\n{"body": "x"}\n{"text": 5}\n')
    c = cfg(**{"data.sources": [str(bad)], "data.on_error": "skip"})
    with pytest.raises(DataError, match=r"no document in 1 corpus file\(s\) \(bad\.jsonl\); skipped invalid JSON: 1, "
                                        r"missing text field: 1, non-string text: 1 \(data\.on_error=skip\)"):
        list(iter_documents(c.data, resolve_sources(c)))
    code, err = cli(capsys, "prepare", f"--data.sources={bad}", "--data.on_error=skip", *cli_settings(tmp_path))
    assert code == 2 and "error: data.sources: no document in 1 corpus file(s)" in err and "Traceback" not in err


def test_every_document_filtered_is_a_data_error_with_the_counts(tmp_path, capsys):
    short = tmp_path / "short.jsonl"
    short.write_bytes(jsonl(["一", "二", "三"]))
    code, err = cli(capsys, "tokenizer", f"--data.sources={short}", "--data.min_chars=5", *cli_settings(tmp_path))
    assert code == 2 and "error: no text to train the tokenizer on: 0 training document(s) read" in err
    c = cfg(**{"data.min_chars": 5})
    with pytest.raises(DataError, match=r"too small to train on: 0 training and 0 validation document\(s\), 0 "
                                        r"training tokens, .*filters: documents_read 3, removed_too_short 3; "
                                        r"bad records skipped: invalid JSON: 2"):
        prepare_shards(c, iter(["一二三", "四五六", "七八九"]), tiny_char_tokenizer(), tmp_path / "d",
                       progress=False, skipped={"invalid JSON": 2})


def tiny_index(train_tokens: list[int], val_tokens: int = 0) -> dict:
    return {"train": [{"name": f"train-{i:05d}.bin", "tokens": n} for i, n in enumerate(train_tokens)],
            "val": [{"name": "val-00000.bin", "tokens": val_tokens}] if val_tokens else [],
            "tokens": {"train": sum(train_tokens), "val": val_tokens},
            "documents": {"train": 3, "val": 1}, "filters": {"documents_read": 5, "removed_too_short": 1},
            "skipped_records": {"invalid JSON": 2}}


def test_a_corpus_smaller_than_one_sequence_is_a_data_error_with_the_counts():
    check_trainable(tiny_index([257]), 256)  # exactly one sequence of seq_len + 1 tokens
    with pytest.raises(DataError, match=r"too small to train on: 3 training and 1 validation document\(s\), "
                                        r"256 training tokens, fewer than one sequence of train\.seq_len\+1 = 257 "
                                        r"tokens; filters: documents_read 5, removed_too_short 1; bad records "
                                        r"skipped: invalid JSON: 2; add text or lower train\.seq_len"):
        check_trainable(tiny_index([256], 40), 256)
    with pytest.raises(DataError, match=r"data\.shard_tokens: no training shard holds train\.seq_len\+1 = 2049"):
        check_trainable(tiny_index([1024, 1024, 1024]), 2048)  # enough tokens, but no shard holds a sequence


# 8. An imported tokenizer's own EOS separates documents ---------------------------------------------------

def tiny_char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate([EOS] + list("一二三四五六七八九"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return tok


def save_hf_tokenizer(out: Path, texts: list[str], specials: list[str], **named) -> Path:
    """A byte-level BPE trained on `texts` with the `tokenizers` library, saved as a transformers
    tokenizer folder with the named special tokens (eos_token=..., bos_token=...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, **named).save_pretrained(str(out))
    return out


def packed_documents(out: Path, index: dict, tok) -> list[str]:
    tokens = np.concatenate([np.fromfile(out / s["name"], dtype=index["dtype"]) for s in index["train"]])
    cuts = np.flatnonzero(tokens == index["eos_id"])
    assert len(tokens) and tokens[-1] == index["eos_id"]
    return [tok.decode(tokens[a + 1:b].tolist()) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


DOCS = [f"第{i}首 床前明月光，疑是地上霜。" for i in range(40)]


def test_a_llama_style_tokenizer_separates_documents_with_its_own_eos(tmp_path):
    path = save_hf_tokenizer(tmp_path / "llama", DOCS, ["<unk>", "<s>", "</s>"],
                             bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok = load_tokenizer(path)
    assert EOS not in tok.get_vocab()
    index = prepare_shards(cfg(**{"data.val_permille": 0}), iter(DOCS), tok, tmp_path / "data", progress=False)
    assert index["eos_id"] == tok.convert_tokens_to_ids("</s>") and index["eos_token"] == "</s>"
    assert packed_documents(tmp_path / "data", index, tok) == DOCS


def test_endoftext_is_preferred_to_a_chat_eos_and_a_tokenizer_without_either_is_refused(tmp_path):
    qwen = save_hf_tokenizer(tmp_path / "qwen", DOCS, [EOS, "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>")
    tok = load_tokenizer(qwen)
    index = prepare_shards(cfg(**{"data.val_permille": 0}), iter(DOCS), tok, tmp_path / "q", progress=False)
    assert index["eos_token"] == EOS and index["eos_id"] == tok.convert_tokens_to_ids(EOS)
    assert packed_documents(tmp_path / "q", index, tok) == DOCS
    bare = load_tokenizer(save_hf_tokenizer(tmp_path / "bare", DOCS, ["<unk>"], unk_token="<unk>"))
    with pytest.raises(ConfigError, match=r"tokenizer\.path: the tokenizer has no <\|endoftext\|> token and no "
                                          r"eos_token"):
        prepare_shards(cfg(), iter(DOCS), bare, tmp_path / "b", progress=False)
