"""Data mixtures (data.weights, data.max_epochs; issue 22): the order's maths on its own, through the
loader on any number of processes, and a two-source run end to end (report, status, resume after a
kill, a resume with other weights refused). A run without data.weights is the one stream it was."""

import json
import re
import types

import numpy as np
import pytest
import torch

from faults import assert_same
from trainer.config import Config, ConfigError, load_config, replace
from trainer.data.loader import BatchLoader, ConcatSamples, global_sample_ids
from trainer.data.mixture import BLOCK, MixtureOrder, quotas, source_names
from trainer.io.artifacts import Artifacts
from trainer.io.storage import open_storage
from trainer.state import protocol

# The order's maths ---------------------------------------------------------------------------------

def test_quotas_by_hand():
    assert quotas([0.7, 0.2, 0.1]).tolist() == [700, 200, 100]
    assert quotas([7, 2, 1]).tolist() == [700, 200, 100]  # only the ratios count
    assert quotas([1, 1, 1]).tolist() == [334, 333, 333]  # largest remainder, lowest index first on ties
    assert quotas([1, 1e-6]).tolist() == [BLOCK - 1, 1]  # a tiny weight still gets a slot
    assert quotas([0.5, 0.0, 0.5]).tolist() == [500, 0, 500]  # a capped-out source gets none


@pytest.mark.parametrize("steps", [1, 5, 20, 200])
def test_token_shares_of_the_first_steps_are_within_one_percent_of_the_weights(steps):
    weights = (0.7, 0.2, 0.1)
    order = MixtureOrder(1234, [5000, 800, 300], weights)
    per_step = 64  # sequences of equal length: token shares are sequence shares
    sources, _ = order.draws(0, steps * per_step)
    shares = np.bincount(sources, minlength=3) / len(sources)
    assert np.abs(shares - weights).max() <= 0.01, shares
    # The same from the closed form at the position a checkpoint saves.
    assert order.drawn_before(steps * per_step).tolist() == np.bincount(sources, minlength=3).tolist()


def test_order_is_a_pure_function_of_the_position():
    sizes, weights, caps = [50, 1000, 300], [0.5, 0.3, 0.2], [2, 0, 1]
    order = MixtureOrder(7, sizes, weights, caps)
    whole = order.sample_ids(0, 4000)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, 4000), size=60, replace=False))
    pieces = [MixtureOrder(7, sizes, weights, caps).sample_ids(int(a), int(b - a))  # fresh objects: no state
              for a, b in zip([0, *cuts], [*cuts, 4000])]
    assert np.array_equal(np.concatenate(pieces), whole)
    sources, js = order.draws(0, 4000)
    for s in range(3):  # the j-th draw from a source is its j-th sample: none skipped, none repeated early
        assert js[sources == s].tolist() == list(range(int((sources == s).sum())))
    for g in (0, 1, 199, 200, 201, 848, 849, 850, 1999, 4000):  # closed form == counting from 0
        assert order.drawn_before(g).tolist() == np.bincount(sources[:g], minlength=3).tolist(), g
    other_seed = MixtureOrder(8, sizes, weights, caps).sample_ids(0, 4000)
    assert not np.array_equal(other_seed, whole)
    assert MixtureOrder(8, sizes, weights, caps).draws(0, 4000)[0].tolist() == sources.tolist()  # who: by weight


def test_a_capped_source_stops_at_exactly_its_passes_and_the_others_share_its_weight():
    order = MixtureOrder(3, [50, 1000, 400], [0.5, 0.3, 0.2], [2, 0, 0])
    sources, _ = order.draws(0, 3000)
    assert (sources == 0).sum() == 100  # 2 passes of 50
    ids = order.sample_ids(0, 3000)[sources == 0]
    assert np.bincount(ids, minlength=50).tolist() == [2] * 50  # each of its samples exactly twice
    assert sorted(ids[:50].tolist()) == list(range(50))  # one whole pass before the second
    end = int(np.flatnonzero(sources == 0)[-1]) + 1
    after = np.bincount(sources[end:end + 10 * BLOCK // 10 * 2], minlength=3)
    assert after[0] == 0 and after[1] / after.sum() == pytest.approx(0.6, abs=0.002)  # 0.3 / (0.3 + 0.2)
    assert order.total is None  # an uncapped source remains: no end


def test_when_every_source_is_capped_the_mixture_ends_and_caps_the_steps():
    from trainer.config import TrainConfig
    from trainer.training.loop import epoch_cap

    order = MixtureOrder(0, [50, 100], [0.5, 0.5], [1, 2])
    assert order.total == 250 and order.drawn_before(10**6).tolist() == [50, 200]
    order.draws(0, 250)
    with pytest.raises(IndexError, match="data.max_epochs"):
        order.draws(240, 20)
    task = types.SimpleNamespace(sequences_per_epoch=150, samples_per_step=8, sequence_limit=order.total)
    assert epoch_cap(TrainConfig(max_epochs=0), task) == 31  # whole steps: 250 // 8
    assert epoch_cap(TrainConfig(max_epochs=1), task) == 19  # train.max_epochs still caps: ceil(150 / 8)


def test_capped_sources_shorter_than_a_step_are_refused_naming_the_cap():
    from trainer.data.mixture import check_trainable

    cfg = load_config(None, {"data.sources": ["a", "b"], "data.weights": [1, 1], "data.max_epochs": [0.1, 0.1],
                             "train.seq_len": 32, "train.batch_tokens": 32 * 64}, env={})
    index = {"train": [{"tokens": 32 * 100 + 1}]}  # 100 sequences: 10 + 10 < 64 per step
    with pytest.raises(ConfigError, match=r"data\.max_epochs: the capped sources give 20 sequences"):
        check_trainable(cfg, [index, index])
    check_trainable(replace(cfg, **{"data.max_epochs": [0.1, 0]}), [index, index])  # one uncapped: no end


def test_source_names():
    assert source_names(["data/web/*.jsonl.zst", "s3://b/books.parquet", "hf://datasets/owner/name", "data/web",
                         "诗词/"]) == ["web", "books", "name", "web-2", "诗词"]


# Through the loader ----------------------------------------------------------------------------------

class Tagged:
    """Samples whose rows say which source and sample they are: [source, id, 0, 0]."""
    seq_len = 3

    def __init__(self, n: int, tag: int):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def get(self, ids):
        out = np.zeros((len(ids), 4), dtype=np.int64)
        out[:, 0], out[:, 1] = self.tag, ids
        return out


def loader_rows(order, parts, per_step: int, world: int, micro: int, position: int, steps: int) -> np.ndarray:
    """Every global sample of `steps` steps from `position`, in global order, as `world` ranks load them."""
    ranks = []
    for rank in range(world):
        loader = BatchLoader(ConcatSamples(parts), 0, per_step, rank, world, micro, torch.device("cpu"), position,
                             order=order.sample_ids)
        ranks.append([[loader.next() for _ in range(per_step // world // micro)] for _ in range(steps)])
        loader.close()
    return torch.cat([torch.cat(ranks[r][s]) for s in range(steps) for r in range(world)]).numpy()


def test_loader_order_does_not_depend_on_processes_or_micro_batch_and_resumes_at_a_position():
    parts = [Tagged(300, 0), Tagged(90, 1), Tagged(40, 2)]
    order = MixtureOrder(5, [len(p) for p in parts], [0.6, 0.3, 0.1], [0, 1, 0])
    one = loader_rows(order, parts, 16, 1, 16, 0, 30)
    assert np.array_equal(loader_rows(order, parts, 16, 2, 4, 0, 30), one)
    assert np.array_equal(loader_rows(order, parts, 16, 4, 1, 0, 30), one)
    assert np.array_equal(loader_rows(order, parts, 16, 2, 2, 12 * 16, 18), one[12 * 16:])  # a resume at step 12
    assert (one[:, 0] == 1).sum() == 90  # source 1 capped at one pass
    starts = np.array([0, 300, 390])
    assert np.array_equal(one[:, 1], order.sample_ids(0, len(one)) - starts[one[:, 0]])


def test_without_weights_the_loader_is_the_one_stream():
    samples = Tagged(100, 0)
    loader = BatchLoader(samples, 1234, 8, 0, 1, 8, torch.device("cpu"), 40)
    rows = np.concatenate([loader.next().numpy() for _ in range(20)])
    loader.close()
    assert rows[:, 1].tolist() == global_sample_ids(1234, 100, 40, 160).tolist()


# Configuration ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, words", [
    ({"data.sources": ["a", "b"], "data.weights": [1]}, "data.weights", "one weight per data.sources entry (2)"),
    ({"data.sources": ["a", "b"], "data.weights": [1, -1]}, "data.weights", "positive"),
    ({"data.sources": ["a", "b"], "data.weights": [1, 0]}, "data.weights", "positive"),
    ({"data.sources": ["a"], "data.weights": [1]}, "data.weights", "at least 2 data.sources"),
    ({"data.sources": ["a", "b"], "data.max_epochs": [1, 0]}, "data.max_epochs", "set data.weights too"),
    ({"data.sources": ["a", "b"], "data.weights": [1, 1], "data.max_epochs": [1]}, "data.max_epochs",
     "one cap per data.sources entry"),
    ({"data.sources": ["a", "b"], "data.weights": [1, 1], "data.max_epochs": [1, -2]}, "data.max_epochs",
     "0 (no cap) or a number"),
])
def test_bad_mixtures_are_refused_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, env={})
    line = next(x for x in str(e.value).splitlines() if x.strip().startswith(key))
    assert words in line, str(e.value)


def test_a_bad_mixture_from_the_cli_exits_2(tmp_path, capsys):
    import entrypoint

    with pytest.raises(SystemExit) as e:
        entrypoint.main(["status", f"--storage.bucket={tmp_path}", "--data.sources=[a,b]", "--data.weights=[1,2,3]"])
    assert e.value.code == 2 and "data.weights: must give one weight per data.sources entry" in capsys.readouterr().err


def test_a_run_without_weights_keeps_its_data_key_and_artifacts():
    from trainer.data.shards import data_hash

    assert Config().data.weights == () and Config().data.max_epochs == ()
    # data/<hash> of a plain run: the value before mixtures existed (weights are not part of a shards folder).
    assert data_hash(Config(), "corpus-fp", "tok-fp") == "4127a06058e1a1c5"
    mixed = load_config(None, {"data.sources": ["a", "b"], "data.weights": [3, 1]}, env={})
    assert data_hash(mixed, "corpus-fp", "tok-fp") == "4127a06058e1a1c5"
    assert Artifacts("t", "d").to_json() == '{"tokenizer_key": "t", "data_key": "d"}'
    arts = Artifacts("t", "", ("data/a", "data/b"))
    assert Artifacts.from_json(arts.to_json()) == arts and arts.keys == ("data/a", "data/b")
    assert Artifacts.from_json('{"tokenizer_key": "t", "data_key": "d"}').keys == ("d",)


# A two-source run end to end --------------------------------------------------------------------------

WEIGHTS = [0.7, 0.3]
N = 16  # steps of 8 sequences


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, tiny_docs):
    """Two corpora: web.jsonl (the first 200 poems) and poetry.jsonl (the other 100)."""
    root = tmp_path_factory.mktemp("sources")
    out = []
    for name, docs in (("web", tiny_docs[:200]), ("poetry", tiny_docs[200:])):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_config, two_sources, cli):
    """`run` (every stage) of a 70/30 mixture, through the CLI: its config, path and output."""
    root = tmp_path_factory.mktemp("mixture")
    cfg = tiny_config(root, {"run.id": "mix", "data.sources": two_sources, "data.weights": WEIGHTS,
                             "train.max_steps": N})
    path = cli.write_config(cfg, root / "mix.yaml")
    done = cli.run("run", path)
    assert done.returncode == 0, done.stdout[-6000:]
    return cfg, path, done.stdout


def outcome(cfg, metrics):
    """(every metrics row without its timings, the newest checkpoint's weights)."""
    from safetensors.torch import load_file

    store = open_storage(cfg.storage.bucket)
    rows = [{k: v for k, v in r.items() if k not in ("tok_per_s", "data_wait")} for r in metrics(store, cfg.run.id)]
    step = protocol.complete_steps(store, cfg.run.id)[0]
    dest = f"{cfg.storage.local_dir}/compare/{cfg.run.id}/model.safetensors"
    store.download_file(f"{protocol.checkpoints_prefix(cfg.run.id)}/{protocol.step_name(step)}/model.safetensors", dest)
    return rows, load_file(dest)


def test_a_mixture_run_end_to_end(mixed, metrics, two_sources):
    from trainer.job.stages import stage_prepare
    from trainer.job.status import status_report

    cfg, _, out = mixed
    store = open_storage(cfg.storage.bucket)
    arts = Artifacts.from_json(store.read_text("runs/mix/artifacts.json"))
    assert len(arts.data_keys) == 2 and arts.data_key == "" and len(set(arts.data_keys)) == 2
    # Each source is prepared alone, with the one tokenizer: the same shards as a run on that source only.
    alone = replace(cfg, **{"data.sources": [two_sources[0]], "data.weights": []})
    assert stage_prepare(alone, None, arts.tokenizer_key).data_key == arts.data_keys[0]
    rows = metrics(store, "mix")
    assert [r["step"] for r in rows] == list(range(1, N + 1))
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    assert all({"val_loss/web", "val_loss/poetry", "val_bpc"} <= r.keys() for r in evals)
    last = evals[-1]
    assert min(last["val_loss/web"], last["val_loss/poetry"]) <= last["val_loss"] <= \
        max(last["val_loss/web"], last["val_loss/poetry"])
    state = json.loads(store.read_text(f"{protocol.checkpoints_prefix('mix')}/{protocol.step_name(N)}/"
                                       "trainer_state.json"))
    assert state["inputs"]["data"].startswith("mixture web=") and "poetry=" in state["inputs"]["data"]
    # Tokens per source in the report and in status: 16 steps x 8 sequences x 32 tokens, 70/30 (+- a sample).
    report = store.read_text("runs/mix/report/report.md")
    line = next(x for x in report.splitlines() if "mixture: tokens and epochs per source" in x)
    tokens = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"(\w+) \d+\.\d%: ([\d,]+) tokens", line)}
    assert sum(tokens.values()) == N * 8 * 32 and abs(tokens["web"] / (N * 8 * 32) - 0.7) <= 0.01, line
    assert f"mixture at step-{N:08d}: web 70.0%: {tokens['web']:,} tokens" in status_report(cfg)
    card = store.read_text("runs/mix/final/README.md")  # the model card lists the shares
    assert "| mixture (data.weights) |" in card and "web.jsonl` 70.0%, `" in card and "poetry.jsonl` 30.0% |" in card


def test_a_mixture_killed_after_a_checkpoint_resumes_the_same_order(mixed, metrics, cli, tmp_path):
    cfg, path, _ = mixed
    store = open_storage(cfg.storage.bucket)
    killed_at = cli.kill_after_a_checkpoint(path, {"run.id": "mix-killed"}, tmp_path / "killed.log", store,
                                            "mix-killed")
    assert killed_at and killed_at[0] < N, f"the run finished before the kill: {killed_at}"
    again = cli.run("pretrain", path, {"run.id": "mix-killed", "run.takeover": "true"})
    assert again.returncode == 0, again.stdout[-6000:]
    assert f"resumed from {protocol.step_name(killed_at[0])}" in again.stdout
    assert_same(outcome(replace(cfg, **{"run.id": "mix-killed"}), metrics), outcome(cfg, metrics))


def test_a_resume_with_other_weights_is_refused(mixed, cli):
    _, path, _ = mixed
    refused = cli.run("pretrain", path, {"train.max_steps": N + 8, "data.weights": "[0.5,0.5]"})
    assert refused.returncode == 2, refused.stdout[-4000:]
    assert "was trained on other inputs (data: mixture web=" in refused.stdout
    assert "run.resume_on_new_data=true" in refused.stdout


def test_a_mixture_of_capped_sources_ends_the_run(tmp_path, tiny_config, two_sources, single_process):
    from trainer.job.stages import prepare_inputs
    from trainer.training.worker import pretrain_worker

    cfg = tiny_config(tmp_path, {"run.id": "capped", "data.sources": two_sources, "data.weights": [1, 1],
                                 "data.max_epochs": [0.05, 0.1], "train.max_steps": 50, "train.warmup_steps": 1})
    arts = prepare_inputs(cfg)
    store = open_storage(cfg.storage.bucket)
    sizes = [sum((s["tokens"] - 1) // 32 for s in json.loads(store.read_text(f"{k}/index.json"))["train"])
             for k in arts.keys]
    total = int(0.05 * sizes[0]) + int(0.1 * sizes[1])
    assert pretrain_worker(cfg, arts)["step"] == total // 8 < 50
