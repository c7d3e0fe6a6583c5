"""Hugging Face `datasets` as corpus sources (issue 16): a `save_to_disk` folder, a local copy of a
Hub dataset repository (parquet or jsonl under data/, or configs in the dataset card) and
hf://datasets/ ids read like files: the same documents and token shards as the equivalent jsonl,
bad rows named by source and index or skipped and counted, a changed dataset refused on resume,
and a Hub id on a machine that cannot reach the Hub a one-line exit 2.

Datasets are built here, offline; the Hub path runs the same code with a local folder as the
location (hf_datasets.hub_location) and the Hub's commit lookup replaced (hf_datasets.hub_revision).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faults import chat_model, sft_config  # noqa: F401 - fixtures
from trainer.config import ConfigError, load_config, replace
from trainer.data.conversations import load_chat_tokenizer, prepare_conversations
from trainer.data.readers import DocumentReader, iter_documents
from trainer.data.sources import DataError, corpus_fingerprint, hf_datasets, resolve_sources
from trainer.io.storage import open_storage
from trainer.job.run import run
from trainer.job.stages import stage_prepare

DOCS = ["床前明月光，疑是地上霜。", "白日依山盡，黃河入海流。", "春眠不覺曉，處處聞啼鳥。"]


def cfg(sources, **overrides):
    return load_config(None, {"data.sources": [str(s) for s in sources], **overrides}, env={})


def read(sources, **overrides) -> tuple[list[str], dict]:
    c = cfg(sources, **overrides)
    reader = DocumentReader(c.data)
    return list(iter_documents(c.data, resolve_sources(c), reader)), dict(reader.skipped)


def saved(folder: Path, columns: dict) -> Path:
    from datasets import Dataset

    Dataset.from_dict(columns).save_to_disk(str(folder))
    return folder


def hub_copy(folder: Path, splits: dict[str, list[dict]], fmt: str = "parquet") -> Path:
    """A Hub repository as `hf download` leaves it: data/<split>-00000-of-00001.<fmt> per split."""
    from datasets import Dataset

    (folder / "data").mkdir(parents=True)
    for split, rows in splits.items():
        name = folder / "data" / f"{split}-00000-of-00001.{fmt}"
        if fmt == "parquet":
            Dataset.from_list(rows).to_parquet(str(name))
        else:
            name.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return folder


def card_repo(folder: Path, rows: list[dict]) -> Path:
    """A repository whose dataset card declares its one config, with files outside data/."""
    (folder / "poems").mkdir(parents=True)
    (folder / "poems" / "part-0.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                   encoding="utf-8")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: poems\n  data_files:\n  - split: train\n"
                                      "    path: poems/*.jsonl\n---\n# Poems\n", encoding="utf-8")
    return folder


# 1. Every layout reads the documents a jsonl file holds -------------------------------------------

def test_each_layout_reads_the_same_documents_as_jsonl(tmp_path):
    rows = [{"text": t, "id": i} for i, t in enumerate(DOCS)]
    other = [{"text": "測試集不讀", "id": 9}]
    sources = {"saved": saved(tmp_path / "saved", {"text": DOCS, "id": [0, 1, 2]}),
               "parquet": hub_copy(tmp_path / "pq", {"train": rows, "test": other}),
               "jsonl": hub_copy(tmp_path / "jl", {"train": rows, "validation": other}, fmt="jsonl"),
               "card": card_repo(tmp_path / "card", rows)}
    for name, folder in sources.items():
        docs, skipped = read([folder])
        assert (name, docs, skipped) == (name, DOCS, {})  # only the train split
        [entry] = resolve_sources(cfg([folder]))
        assert entry.dataset is not None and entry.dataset.layout == ("saved" if name == "saved" else "repo")
    # A plain folder of corpus files is still read file by file (both files, no split logic).
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")
    (plain / "test.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n")
    assert sorted(read([plain])[0]) == sorted(DOCS[:2])
    assert [f.dataset for f in resolve_sources(cfg([plain]))] == [None, None]


@pytest.mark.parametrize("layout", ["saved", "parquet", "jsonl"])
def test_prepare_makes_the_same_shards_as_the_jsonl_file(tmp_path, tiny_config, tiny_corpus, tiny_docs, layout):
    """The real tokenizer + prepare stages: byte-identical shards, same filter counts (dedup too)."""
    docs = tiny_docs + tiny_docs[:7]  # 7 exact duplicates for dedup to remove
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    if layout == "saved":
        folder = saved(tmp_path / "ds", {"text": docs})
    else:
        folder = hub_copy(tmp_path / "ds", {"train": [{"text": t} for t in docs]}, fmt=layout)
    indexes = []
    for root, source in (("file-run", jsonl), ("dataset-run", folder)):
        c = tiny_config(tmp_path / root, {"data.sources": [str(source)]})
        arts = stage_prepare(c)
        indexes.append(json.loads(open_storage(c.storage.bucket).read_text(f"{arts.data_key}/index.json")))
    from_file, from_dataset = indexes
    assert from_dataset["filters"] == from_file["filters"] and from_file["filters"]["removed_duplicate"] == 7
    assert from_dataset["tokens"] == from_file["tokens"] and from_file["tokens"]["train"] > 10_000
    assert [s["sha256"] for s in from_dataset["train"]] == [s["sha256"] for s in from_file["train"]]
    assert from_dataset["skipped_records"] == {}


# 2. The Hub path: the same code, another location ---------------------------------------------------

def test_a_hub_id_streams_its_train_split_pinned_to_the_commit(tmp_path, monkeypatch):
    repo = hub_copy(tmp_path / "repo", {"train": [{"text": t} for t in DOCS], "test": [{"text": "不讀"}]})
    card = card_repo(tmp_path / "card", [{"text": t} for t in DOCS[::-1]])
    folders = {"owner/poems": repo, "owner/carded": card}
    asked, opened = [], []
    monkeypatch.setattr(hf_datasets, "hub_revision", lambda source, repo_id, rev: asked.append((repo_id, rev))
                        or ("a" * 40 if rev is None else "b" * 40))
    monkeypatch.setattr(hf_datasets, "hub_location", lambda repo_id: opened.append(repo_id) or str(folders[repo_id]))
    import datasets

    streamed = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: streamed.append(k) or real_load(*a, **k))

    assert read(["hf://datasets/owner/poems"]) == (DOCS, {})
    assert read(["hf://datasets/owner/carded@v1/poems"]) == (DOCS[::-1], {})
    assert asked == [("owner/poems", None), ("owner/carded", "v1")] and opened == ["owner/poems", "owner/carded"]
    assert [(k["streaming"], k["split"], k["revision"]) for k in streamed] == [(True, "train", "a" * 40),
                                                                               (True, "train", "b" * 40)]
    # The identity is the commit: another commit of the same id is another corpus.
    one = corpus_fingerprint(resolve_sources(cfg(["hf://datasets/owner/poems"])))
    monkeypatch.setattr(hf_datasets, "hub_revision", lambda source, repo_id, rev: "c" * 40)
    assert corpus_fingerprint(resolve_sources(cfg(["hf://datasets/owner/poems"]))) != one


# 3. SFT conversations from datasets ----------------------------------------------------------------

CHATS = [[{"role": "user", "content": "床前明月光"}, {"role": "assistant", "content": "疑是地上霜"}],
         [{"role": "system", "content": "你是詩人"}, {"role": "user", "content": "春眠不覺曉"},
          {"role": "assistant", "content": "處處聞啼鳥"}],
         [{"role": "user", "content": "白日依山盡"}, {"role": "assistant", "content": "黃河入海流"}]]


def test_sft_reads_conversations_from_a_saved_dataset_and_a_hub_copy(tmp_path, chat_model):
    tok = load_chat_tokenizer(chat_model)
    folders = [saved(tmp_path / "saved", {"messages": CHATS, "source": ["hand"] * 3}),
               hub_copy(tmp_path / "repo", {"train": [{"messages": c} for c in CHATS]})]
    for i, folder in enumerate(folders):
        c = sft_config(tmp_path / f"run{i}", chat_model, [folder])
        index = json.loads((prepare_conversations(c, tok, 256) / "index.json").read_text())
        assert index["conversations"] == 3 and index["skipped_records"] == {} and index["files"] == [str(folder)]
    bad = saved(tmp_path / "bad", {"messages": [CHATS[0], CHATS[1][::-1], CHATS[2]]})
    with pytest.raises(DataError, match=r"/bad \(train split, index 1\): turn 1: assistant before any user turn \(set "
                                        r"data.on_error=skip"):
        prepare_conversations(sft_config(tmp_path / "bad-run", chat_model, [bad]), tok, 256)
    skip = sft_config(tmp_path / "skip-run", chat_model, [bad], **{"data.on_error": "skip"})
    index = json.loads((prepare_conversations(skip, tok, 256) / "index.json").read_text())
    assert index["conversations"] == 2 and index["skipped_records"] == {"wrong order": 1}
    no_column = saved(tmp_path / "nocol", {"conversations": CHATS})
    with pytest.raises(DataError, match=r"/nocol: no column 'messages' \(sft.messages_field\); columns: "
                                        r"\['conversations'\]"):
        prepare_conversations(sft_config(tmp_path / "nocol-run", chat_model, [no_column]), tok, 256)
    renamed = sft_config(tmp_path / "renamed-run", chat_model, [no_column], **{"sft.messages_field": "conversations"})
    assert json.loads((prepare_conversations(renamed, tok, 256) / "index.json").read_text())["conversations"] == 3


# 4. Bad inputs: one line naming the source (and row), or skipped and counted ---------------------------

def test_a_missing_text_column_names_the_source_and_the_columns(tmp_path):
    folder = saved(tmp_path / "ds", {"body": DOCS})
    with pytest.raises(DataError) as e:
        read([folder])
    assert str(e.value) == (f"{folder}: no column 'text' (data.text_field); columns: ['body'] "
                            f"(set data.on_error=skip to skip such records)")
    with pytest.raises(DataError, match=r"no document in 1 corpus file\(s\) \(ds\); skipped missing text field: 1"):
        read([folder], **{"data.on_error": "skip"})
    assert read([folder], **{"data.text_field": "body"}) == (DOCS, {})  # the sibling: the right column


def test_non_string_and_null_text_are_bad_rows_named_by_index(tmp_path):
    numbers = saved(tmp_path / "numbers", {"text": [1, 2]})
    with pytest.raises(DataError, match=r"/numbers \(train split, index 0\): 'text' is int, not a string"):
        read([numbers])
    holes = saved(tmp_path / "holes", {"text": [DOCS[0], None, DOCS[1]]})
    with pytest.raises(DataError, match=r"/holes \(train split, index 1\): 'text' is NoneType, not a string"):
        read([holes])
    assert read([holes], **{"data.on_error": "skip"}) == (DOCS[:2], {"non-string text": 1})
    # A streamed jsonl repository: a record without the key is a bad row too.
    repo = hub_copy(tmp_path / "repo", {"train": [{"text": DOCS[0]}, {"body": "x"}, {"text": DOCS[2]}]}, fmt="jsonl")
    assert read([repo], **{"data.on_error": "skip"}) == ([DOCS[0], DOCS[2]], {"non-string text": 1})


def test_an_empty_dataset_is_a_bad_source(tmp_path):
    from datasets import Dataset, Features, Value

    folder = tmp_path / "empty"
    Dataset.from_dict({"text": []}, features=Features({"text": Value("string")})).save_to_disk(str(folder))
    with pytest.raises(DataError, match=r"/empty: the train split has no rows \(set data.on_error=skip"):
        read([folder])
    full = saved(tmp_path / "full", {"text": DOCS})
    assert read([folder, full], **{"data.on_error": "skip"}) == (DOCS, {"empty dataset": 1})


def test_a_dataset_dict_reads_its_train_split_or_names_the_splits_it_has(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": DOCS}), "test": Dataset.from_dict({"text": ["不讀"]})}
                ).save_to_disk(str(tmp_path / "dd"))
    assert read([tmp_path / "dd"]) == (DOCS, {})
    DatasetDict({"test": Dataset.from_dict({"text": DOCS}), "validation": Dataset.from_dict({"text": DOCS})}
                ).save_to_disk(str(tmp_path / "no-train"))
    for on_error in ("fail", "skip"):  # not a bad record: the source itself is wrong
        with pytest.raises(DataError) as e:
            read([tmp_path / "no-train"], **{"data.on_error": on_error})
        assert "\n" not in str(e.value)
        assert str(e.value).startswith(f"{tmp_path / 'no-train'}: a DatasetDict without a 'train' split (splits: "
                                       f"['test', 'validation'])")


def test_a_repository_copy_without_a_train_split_names_the_splits(tmp_path):
    repo = hub_copy(tmp_path / "repo", {"test": [{"text": DOCS[0]}]})
    with pytest.raises(DataError, match=r"/repo: `datasets` cannot read the train split \(ValueError: .*'test'"):
        read([repo])


def test_a_corrupt_file_in_a_repository_copy_names_the_source(tmp_path):
    repo = hub_copy(tmp_path / "repo", {"train": [{"text": t} for t in DOCS]})
    (repo / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    for on_error in ("fail", "skip"):  # the schema cannot be read: the source, not a record, is bad
        with pytest.raises(DataError) as e:
            read([repo], **{"data.on_error": on_error})
        assert str(e.value).startswith(f"{repo}: `datasets` cannot read the train split (ArrowInvalid: ")
        assert "\n" not in str(e.value)


def cli(capsys, *args: str) -> tuple[int, str]:
    import entrypoint

    with pytest.raises(SystemExit) as e:
        entrypoint.main(list(args))
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("how", ["unreachable", "HF_HUB_OFFLINE"])
def test_a_hub_id_on_a_machine_that_cannot_reach_the_hub_is_exit_2_in_one_line(tmp_path, capsys, monkeypatch, how):
    import huggingface_hub.constants

    # Deterministic on any machine: nothing listens on port 9 of loopback, or offline mode is on.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, err = cli(capsys, "prepare", "--data.sources=hf://datasets/opencsg/chinese-fineweb/2024",
                    f"--storage.bucket={tmp_path / 'bucket'}", f"--storage.local_dir={tmp_path / 'work'}")
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert ("data.sources[0]: hf://datasets/opencsg/chinese-fineweb/2024: this machine could not reach the Hub "
            "(http://127.0.0.1:9") in lines[0]
    assert not (tmp_path / "bucket").exists() or not any((tmp_path / "bucket").rglob("index.json"))


@pytest.mark.parametrize("source", ["hf://datasets/owner", "hf://datasets/owner/name/config/extra", "hf://owner/name",
                                    "hf://datasets//name"])
def test_a_malformed_hub_id_says_the_shape(source):
    with pytest.raises(DataError, match=r"data.sources\[0\]: .*hf://datasets/<owner>/<name>"):
        resolve_sources(cfg([source]))


# 5. Identity: a changed dataset is a changed input -------------------------------------------------

def test_the_fingerprint_follows_the_rows_not_the_save(tmp_path):
    def fp(folder):
        return corpus_fingerprint(resolve_sources(cfg([folder])))

    a = fp(saved(tmp_path / "a", {"text": DOCS}))
    assert fp(saved(tmp_path / "again" / "a", {"text": DOCS})) == a  # saved again elsewhere: same input
    assert fp(saved(tmp_path / "edited" / "a", {"text": DOCS[:2] + ["春眠不覺曉，處處聞啼鳥！"]})) != a
    repo = hub_copy(tmp_path / "repo", {"train": [{"text": t} for t in DOCS]})
    before = fp(repo)
    from datasets import Dataset

    Dataset.from_list([{"text": t} for t in DOCS[:2]]).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    after = fp(repo)
    assert after != before
    (repo / ".cache").mkdir()  # what `hf download` keeps beside the files: not part of the input
    (repo / ".cache" / "x.lock").write_text("lock")
    assert fp(repo) == after


def test_resuming_on_a_changed_dataset_is_refused(tmp_path, tiny_config, tiny_docs, single_process):
    folder = saved(tmp_path / "corpus", {"text": tiny_docs})
    c = tiny_config(tmp_path, {"run.id": "hf", "data.sources": [str(folder)], "train.max_steps": 4})
    assert run(c) == 0
    import shutil

    shutil.rmtree(folder)
    saved(folder, {"text": tiny_docs[:-20]})
    with pytest.raises(ConfigError, match=r"run.id=hf: step-00000004 was trained on other inputs"):
        run(replace(c, **{"train.max_steps": 8}))
