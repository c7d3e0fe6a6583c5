"""The tokenizer's spread read (trainer/data/sample.py): bounded as the corpus grows, seeded and
deterministic, spread over many files, whole records at any offset, parquet row groups, compressed
files read from their start and stopped, held-out documents kept out."""

from __future__ import annotations

import io
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from trainer.config import DataConfig, load_config
from trainer.data import sample, streams
from trainer.data.readers import DocumentReader, iter_documents
from trainer.data.sample import FileRead, plan_reads, read_sample, record_ranges, sample_key
from trainer.data.shards import is_validation
from trainer.data.sources import DataError, local_files
from trainer.data.tokenizer import tokenizer_hash, train_from_corpus

WINDOW = 4096  # tests' windows: a corpus of a few hundred KB is many windows


@pytest.fixture(autouse=True)
def small_windows(monkeypatch):
    monkeypatch.setattr(sample, "WINDOW_BYTES", WINDOW)


def doc(file: int, i: int, rng: random.Random) -> str:
    """A document that names its file and place, of 10-400 characters, some with line breaks."""
    body = "".join(rng.choice("春風明月山水花鳥雲天") for _ in range(rng.randint(10, 400)))
    return f"f{file} d{i} " + (body if i % 5 else body[:5] + "\n" + body[5:])


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def make_corpus(root: Path, n_files: int, n_docs: int = 200, ext: str = "jsonl") -> tuple[list, set[str]]:
    """n_files files of n_docs documents each (jsonl, or txt: documents separated by blank lines)."""
    root.mkdir(parents=True, exist_ok=True)
    rng, every = random.Random(0), set()
    paths = []
    for f in range(n_files):
        docs = [doc(f, i, rng) for i in range(n_docs)]
        every |= set(docs)
        path = root / f"part-{f:03d}.{ext}"
        if ext == "txt":
            path.write_text("\n\n".join(d.replace("\n", " ") for d in docs) + "\n", encoding="utf-8")
            every |= {d.replace("\n", " ") for d in docs}
        else:
            write_jsonl(path, docs)
        paths.append(path)
    return local_files(paths), every


class CountedFile(io.RawIOBase):
    """A file opened for reading whose bytes are added to `counter[path]`."""

    def __init__(self, path, counter: Counter):
        self._f, self._path, self._counter = open(path, "rb", buffering=0), str(path), counter

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()

    def readinto(self, buf):
        n = self._f.readinto(buf)
        self._counter[self._path] += n
        return n

    def close(self):
        self._f.close()
        super().close()


@pytest.fixture
def bytes_read(monkeypatch) -> Counter:
    """Bytes read from each corpus file by trainer/data/streams.py (the readers' byte streams) and
    sample.py (every `open` there)."""
    counter: Counter = Counter()

    def counted_open(path, mode="r", buffering=-1, **kw):
        assert mode == "rb", mode
        raw = CountedFile(path, counter)
        return raw if buffering == 0 else io.BufferedReader(raw, buffering if buffering > 0 else 1 << 13)

    monkeypatch.setattr(streams, "open", counted_open, raising=False)
    monkeypatch.setattr(sample, "open", counted_open, raising=False)
    return counter


def test_bytes_read_stay_bounded_as_the_corpus_grows(tmp_path, bytes_read):
    cfg, sample_bytes = DataConfig(), 40_000
    small, _ = make_corpus(tmp_path / "small", 8)
    large, _ = make_corpus(tmp_path / "large", 64)
    read = {}
    for name, files in (("small", small), ("large", large)):
        bytes_read.clear()
        docs = list(read_sample(cfg, files, sample_bytes))
        read[name] = sum(bytes_read.values())
        assert sum(len(d.encode()) for d in docs) >= sample_bytes  # enough to fill the sample
    corpus = {name: sum(f.size for f in files) for name, files in (("small", small), ("large", large))}
    assert corpus["large"] == pytest.approx(8 * corpus["small"], rel=0.05) and corpus["small"] > 10 * sample_bytes
    # the budget, plus per window its two boundary scans (a 4 KiB read each) and the file buffer's
    # 8 KiB read-ahead past the window's end
    budget, windows = 2 * sample_bytes, -(-2 * sample_bytes // WINDOW)
    for name in read:
        assert read[name] <= budget + windows * (2 * 4096 + 8192), (name, read)
    assert read["large"] < 1.3 * read["small"]
    bytes_read.clear()
    list(iter_documents(cfg, large))  # the whole read, for scale
    assert sum(bytes_read.values()) >= corpus["large"] > 20 * read["large"]


def test_the_plan_is_seeded_and_deterministic(tmp_path):
    files, _ = make_corpus(tmp_path / "a", 32)
    cfg, sample_bytes = DataConfig(), 40_000
    first = list(read_sample(cfg, files, sample_bytes, seed=0))
    assert list(read_sample(cfg, files, sample_bytes, seed=0)) == first
    assert list(read_sample(cfg, files[::-1], sample_bytes, seed=0)) == first  # listing order does not matter
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # nor where the files lie
    moved = local_files(sorted((tmp_path / "b").iterdir()))
    assert list(read_sample(cfg, moved, sample_bytes, seed=0)) == first
    other = list(read_sample(cfg, files, sample_bytes, seed=1))
    assert other != first and len(set(other) & set(first)) < len(first) // 2


def test_the_read_spreads_over_many_files_in_proportion_to_their_size(tmp_path):
    files, _ = make_corpus(tmp_path, 48, n_docs=60)
    plan = plan_reads(files, 80_000)
    touched = {r.file.name for r in plan}
    assert len(touched) >= 15  # 20 windows over 48 files: not only the first few
    order = [r.file.name for r in plan]
    assert order != sorted(order)  # read in the seeded order
    docs = list(read_sample(DataConfig(), files, 40_000))
    assert len({d.split()[0] for d in docs}) >= 15  # (a window in a file's last line reads nothing)
    big = write_jsonl(tmp_path / "big.jsonl", [doc(99, i, random.Random(i)) for i in range(2000)])
    files = local_files([*(f.local for f in files[:8]), big])
    shares = {r.file.name: r.share for r in plan_reads(files, 80_000)}
    big_part = big.stat().st_size / sum(f.size for f in files)
    assert shares["big.jsonl"] / sum(shares.values()) == pytest.approx(big_part, abs=0.06)  # share follows size


@pytest.mark.parametrize("ext", ["jsonl", "txt"])
def test_every_offset_resyncs_to_whole_records(tmp_path, ext):
    files, every = make_corpus(tmp_path, 1, n_docs=400, ext=ext)
    f = files[0]
    whole = list(DocumentReader(DataConfig()).iter_file(f))
    rng = random.Random(0)
    for _ in range(30):
        a, b, c = sorted(rng.randrange(f.size) for _ in range(3))
        reads = [FileRead(f, ((x, y),), y - x) for x, y in ((a, b), (b, c), (a, c))]
        parts = []
        for r in reads:
            docs = list(sample.iter_read(DocumentReader(DataConfig()), r))
            assert set(docs) <= every  # whole records only, never a piece of one
            parts.append(docs)
        assert parts[0] + parts[1] == parts[2]  # windows that meet neither overlap nor leave a gap
        if parts[2]:
            i = whole.index(parts[2][0])
            assert whole[i:i + len(parts[2])] == parts[2]  # a contiguous run of the file's records
    # a range inside one record gives nothing
    a = f.size // 2
    assert record_ranges(FileRead(f, ((a, a + 1),), 1), blank_line=ext == "txt") == []


def test_parquet_reads_the_row_groups_its_windows_fall_in(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    rng, paths, groups_of = random.Random(0), [], {}
    for f in range(6):
        docs = [doc(f, i, rng) for i in range(1000)]
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=50)  # 20 row groups per file
        groups_of.update({d: (f, i // 50) for i, d in enumerate(docs)})
        paths.append(path)
    files = local_files(paths)
    corpus = sum(f.size for f in files)
    sample_bytes = corpus // 40
    docs = list(read_sample(DataConfig(), files, sample_bytes))
    assert set(docs) <= set(groups_of)
    touched = Counter(groups_of[d] for d in docs)
    assert len({f for f, _ in touched}) >= 4 and len({g for _, g in touched}) >= 8  # files and groups spread
    assert len(touched) < 6 * 20 // 2  # not every row group
    by_group: dict = {}
    for d in docs:
        by_group.setdefault(groups_of[d], []).append(d)
    # each group is read from its first row, for its windows' share of text
    for (f, g), got in by_group.items():
        first_rows = [d for d, where in groups_of.items() if where == (f, g)][:len(got)]
        assert got == first_rows


def test_compressed_files_are_read_from_their_start_and_stopped(tmp_path, bytes_read):
    zstandard = pytest.importorskip("zstandard")

    rng, paths, heads = random.Random(0), [], {}
    for f in range(4):
        docs = [doc(f, i, rng) for i in range(3000)]
        raw = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
        path = tmp_path / f"part-{f}.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor(level=1).compress(raw))
        heads[f] = docs
        paths.append(path)
    files = local_files(paths)
    sample_bytes = sum(f.size for f in files) // 8
    docs = list(read_sample(DataConfig(), files, sample_bytes))
    by_file: dict = {}
    for d in docs:
        by_file.setdefault(int(d.split()[0][1:]), []).append(d)
    assert len(by_file) >= 3
    for f, got in by_file.items():
        assert got == heads[f][:len(got)] and len(got) < len(heads[f]) // 2  # a prefix, not the file
    assert sum(bytes_read.values()) < sum(f.size for f in files) * 0.6  # nor decompressed to its end


def test_held_out_documents_stay_out_of_the_sample(tmp_path, monkeypatch):
    from trainer.data import tokenizer

    files, _ = make_corpus(tmp_path / "c", 24)
    cfg = load_config(None, {"tokenizer.vocab_size": 400, "tokenizer.sample_bytes": 60_000,
                             "data.val_permille": 100}, env={})
    trained_on = []
    real = tokenizer.train_in_child  # the texts handed to the training process
    monkeypatch.setattr(tokenizer, "train_in_child", lambda texts, *a, **k: trained_on.extend(texts) or
                        real(texts, *a, **k))
    heldout = lambda t: is_validation(t, cfg.data.val_permille)  # noqa: E731
    report = train_from_corpus(cfg, read_sample(cfg.data, files, cfg.tokenizer.sample_bytes), tmp_path / "tok",
                               heldout)
    assert trained_on and not any(heldout(t) for t in trained_on)
    assert report["heldout_documents"] > 10 and "heldout_note" not in report
    assert report["corpus_train_bytes"] < 3 * cfg.tokenizer.sample_bytes  # a bounded read, not the corpus


def test_a_corpus_within_the_budget_is_read_whole_with_its_old_hash(tmp_path):
    files, _ = make_corpus(tmp_path, 4, n_docs=50)
    cfg = DataConfig()
    corpus = sum(f.size for f in files)
    half = -(-corpus // 2)  # the budget is twice the sample: the corpus fits
    assert plan_reads(files, corpus) is None and sample_key(files, half) == ""
    assert list(read_sample(cfg, files, half)) == list(iter_documents(cfg, files))
    tok_cfg = load_config(None, {}, env={})
    assert tokenizer_hash(tok_cfg, "fp", sample_key(files, half)) == tokenizer_hash(tok_cfg, "fp")
    spread = sample_key(files, corpus // 4)
    assert spread.startswith(sample.SAMPLE_VERSION)
    assert tokenizer_hash(tok_cfg, "fp", spread) != tokenizer_hash(tok_cfg, "fp")
    assert sample_key(files, corpus // 4, seed=1) != spread


def test_a_bad_record_in_a_window_names_the_line_of_the_file(tmp_path):
    rng = random.Random(0)
    lines = [json.dumps({"text": doc(0, i, rng)}, ensure_ascii=False) for i in range(2000)]
    lines[1500] = "{not json"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    f = local_files([path])[0]
    start = len("\n".join(lines[:1400]).encode()) + 1
    with pytest.raises(DataError, match=r"bad\.jsonl:1501: invalid JSON"):
        list(sample.iter_read(DocumentReader(DataConfig()), FileRead(f, ((start, f.size),), f.size - start)))


def test_the_stage_trains_on_the_spread_read_and_reuses_it(tmp_path, tiny_config, monkeypatch):
    from trainer.data.sources import corpus_fingerprint, resolve_sources
    from trainer.io.artifacts import bucket
    from trainer.job.stages import stage_tokenizer, trained_tokenizer_key

    cfg = tiny_config(tmp_path, {"tokenizer.sample_bytes": 10_000})
    files = resolve_sources(cfg)
    assert sum(f.size for f in files) > 4 * cfg.tokenizer.sample_bytes  # more than the read budget
    key = stage_tokenizer(cfg)
    assert key == trained_tokenizer_key(cfg, files) != f"tokenizers/{tokenizer_hash(cfg, corpus_fingerprint(files))}"
    report = json.loads(bucket(cfg).read_text(f"{key}/report.json"))
    assert report["sample_read"]["mode"] == "spread" and report["sample_read"]["files_read"] == 1
    assert report["corpus_train_bytes"] < 3 * cfg.tokenizer.sample_bytes < sum(f.size for f in files)
    monkeypatch.setattr("trainer.data.tokenizer.train_from_corpus", lambda *a, **k: pytest.fail("trained again"))
    assert stage_tokenizer(cfg) == key


def test_a_tokenizer_trained_on_the_whole_read_before_is_kept_for_its_inputs(tmp_path, tiny_config, monkeypatch):
    """Migration: a bucket whose tokenizer for these inputs was trained by the whole-corpus read
    (its key has no sample part) keeps it, so a run started before the spread read resumes on the
    same token ids; without it the stage trains on the spread read."""
    from trainer.data.sources import corpus_fingerprint, resolve_sources
    from trainer.io.artifacts import bucket
    from trainer.job.stages import stage_tokenizer, trained_tokenizer_key

    cfg = tiny_config(tmp_path, {"tokenizer.sample_bytes": 10_000})
    files, store = resolve_sources(cfg), bucket(cfg)
    spread = stage_tokenizer(cfg)  # stands in for the old tokenizer: copy it under the legacy key
    legacy = f"tokenizers/{tokenizer_hash(cfg, corpus_fingerprint(files))}"
    for obj in store.list(spread + "/"):
        store.write_bytes(f"{legacy}/{obj.key.rsplit('/', 1)[-1]}", store.read_bytes(obj.key))
    store.delete_prefix(spread + "/")
    monkeypatch.setattr("trainer.data.tokenizer.train_from_corpus", lambda *a, **k: pytest.fail("trained again"))
    assert stage_tokenizer(cfg) == legacy == trained_tokenizer_key(cfg, files, store)
    assert trained_tokenizer_key(cfg, files) == spread  # without the bucket: the spread read's key


def test_a_file_of_one_record_longer_than_every_window_gives_its_record(tmp_path):
    """Every window of the read lies inside the file's one line: the sample takes the line (it read
    nothing and refused a corpus of documents before)."""
    path = tmp_path / "one.jsonl"
    text = "床前明月光，疑是地上霜。" * 20_000
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n" + json.dumps({"text": "短"}) + "\n",
                    encoding="utf-8")
    (f,) = local_files([path])
    windows = ((f.size // 4, f.size // 4 + 10), (f.size // 2, f.size // 2 + 10))
    read = FileRead(f, windows, 20)
    assert record_ranges(read, blank_line=False) == []  # each window alone holds no whole record
    assert list(sample.iter_read(DocumentReader(DataConfig()), read)) == [text]
