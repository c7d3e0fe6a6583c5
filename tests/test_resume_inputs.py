"""Resume never trains the wrong thing (issue 13): a checkpoint records what it was trained on
(LoopState.inputs: tokenizer, data, model, seq_len), and `run` refuses, with exit 2 and before
anything of the run is written, to resume it on other inputs; a changed batch resumes from the
sequences actually consumed; validation is a fixed set; shipped configs run on 1, 2, 4, 8 GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from trainer.config import ConfigError, load_config, replace
from trainer.data.loader import validation_batches
from trainer.io.storage import open_storage
from trainer.job.run import run
from trainer.state import protocol
from trainer.training.loop import batch_geometry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def shards(tmp_path, tiny_docs) -> tuple[Path, Path]:
    """The tiny corpus cut into shard A (first half) and shard B (second half)."""
    half = len(tiny_docs) // 2
    out = []
    for name, docs in (("a", tiny_docs[:half]), ("b", tiny_docs[half:])):
        path = tmp_path / "corpus" / f"shard-{name}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
        out.append(path)
    return tuple(out)


def bucket_files(cfg) -> dict[str, int]:
    """Every object of the bucket with its size, lease excluded (the job takes and releases it)."""
    return {o.key: o.size for o in open_storage(cfg.storage.bucket).list("") if not o.key.endswith("lease.json")}


@pytest.fixture
def first_run(tmp_path, tiny_config, shards, single_process):
    """run.id=x trained for 4 steps on shard A; returns its config."""
    cfg = tiny_config(tmp_path, {"run.id": "x", "data.sources": [str(shards[0])], "train.max_steps": 4})
    assert run(cfg) == 0
    assert protocol.complete_steps(open_storage(cfg.storage.bucket), "x") == [4]
    return cfg


def saved_state(store, step: int) -> dict:
    """trainer_state.json of run x's checkpoint `step`."""
    folder = f"{protocol.checkpoints_prefix('x')}/{protocol.step_name(step)}"
    return json.loads(store.read_text(f"{folder}/trainer_state.json"))


def refused(cfg, *needles: str, new_files_ok: bool = False) -> str:
    """Assert `run` refuses cfg with a one-line ConfigError holding needles; nothing in the bucket
    overwritten, nothing of the run written (new_files_ok: shared caches such as new token shards
    may appear, as any `prepare` makes them)."""
    before = bucket_files(cfg)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message
    after = bucket_files(cfg)
    assert {k: after.get(k) for k in before} == before  # none removed or overwritten
    added = set(after) - set(before)
    assert not added if not new_files_ok else not {k for k in added if k.startswith("runs/")}, added
    return message


def test_a_changed_corpus_would_retrain_the_tokenizer_so_the_resume_is_refused(first_run, shards):
    cfg = replace(first_run, **{"data.sources": [str(s) for s in shards], "train.max_steps": 8})
    message = refused(cfg, "run.id=x: step-00000004 was trained on other inputs", "tokenizer",
                      "start a new run (another run.id)", "run.resume_on_new_data=true", "tokenizer.path=")
    # The explicit way on: the run's own tokenizer on the new corpus.
    tok_url = message.split("tokenizer.path=")[1].split()[0]
    ok = replace(cfg, **{"tokenizer.path": tok_url, "run.resume_on_new_data": True})
    assert run(ok) == 0
    store = open_storage(cfg.storage.bucket)
    assert protocol.complete_steps(store, "x")[0] == 8
    state = saved_state(store, 8)
    assert state["inputs"]["data"] != saved_state(store, 4)["inputs"]["data"]


def test_new_data_with_the_old_tokenizer_still_needs_the_explicit_setting(first_run, shards):
    tok_key = json.loads(open_storage(first_run.storage.bucket).read_text("runs/x/artifacts.json"))["tokenizer_key"]
    cfg = replace(first_run, **{"data.sources": [str(s) for s in shards], "train.max_steps": 8,
                                "tokenizer.path": open_storage(first_run.storage.bucket).url(tok_key)})
    refused(cfg, "data: ", "run.resume_on_new_data=true", new_files_ok=True)


def test_other_tokenizer_settings_are_refused_too(first_run):
    refused(replace(first_run, **{"tokenizer.vocab_size": 600, "train.max_steps": 8}), "tokenizer")


@pytest.mark.parametrize("change, what", [({"model.preset": "6m"}, "model: tiny"),
                                          ({"model.tie_embeddings": True}, "tied embeddings False"),
                                          ({"train.seq_len": 64, "train.batch_tokens": 512}, "seq_len: 32 -> 64")])
def test_another_model_or_sequence_length_is_refused_before_anything_is_written(first_run, change, what):
    refused(replace(first_run, **{**change, "train.max_steps": 8}), what, "start a new run (another run.id)")


def test_a_changed_batch_resumes_from_the_sequences_consumed(first_run):
    """4 steps of 8 sequences, then 4 steps of 16: the data position goes on from 32, so no sequence
    of the data order is skipped or trained twice."""
    cfg = replace(first_run, **{"train.batch_tokens": 512, "train.max_steps": 8})
    assert run(cfg) == 0
    store = open_storage(cfg.storage.bucket)
    state = saved_state(store, 8)
    assert state["data_position"] == 4 * 8 + 4 * 16 and state["tokens_seen"] == (4 * 8 + 4 * 16) * 32


class Samples:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def get(self, ids):
        return np.asarray(ids)[:, None]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_validation_covers_the_same_sequences_on_any_number_of_processes(world):
    seen = sorted(int(i) for rank in range(world) for b in validation_batches(Samples(100), 40, 16, rank, world)
                  for i in b[:, 0])
    assert seen == list(range(40))


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_shipped_config_runs_on_1_2_4_or_8_gpus(path, world):
    cfg = load_config(str(path), env={})
    micro, accum = batch_geometry(cfg.train.batch_tokens // cfg.train.seq_len, world, cfg.train.micro_batch_size)
    assert micro * accum * world == cfg.train.batch_tokens // cfg.train.seq_len
    assert micro <= (cfg.train.micro_batch_size or 16)
    if "sft" in yaml.safe_load(path.read_text()) or path.name.startswith("sft"):
        micro, accum = batch_geometry(cfg.sft.batch_sequences, world, cfg.train.micro_batch_size)
        assert micro * accum * world == cfg.sft.batch_sequences


def test_a_corpus_smaller_than_one_sequence_is_exit_2_before_training(tmp_path, tiny_config, shards, single_process):
    from trainer.data.sources import DataError

    cfg = tiny_config(tmp_path, {"run.id": "short", "data.sources": [str(shards[0])], "train.seq_len": 100_000,
                                 "train.batch_tokens": 100_000})
    with pytest.raises(DataError, match="train.seq_len"):
        run(cfg)
    assert protocol.complete_steps(open_storage(cfg.storage.bucket), "short") == []
    assert not open_storage(cfg.storage.bucket).exists("runs/short/config.yaml")
