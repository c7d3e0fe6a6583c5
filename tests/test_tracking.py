"""run.report_to=wandb: a tiny run through the CLI writes an offline W&B run (WANDB_MODE=offline)
holding every metrics row at its step with metrics.jsonl's values, the resolved config and the
samples; a resumed run logs no step W&B already holds; wandb missing is exit 2 before anything runs;
a W&B failure mid-run warns once and training goes on.

The offline run is read from its .wandb file, W&B's transaction log (LevelDB's log format: 32 KiB
blocks of checksummed chunks, each record a wandb_internal_pb2.Record), with wandb's own protobufs:
wandb >= 0.2x reads it only in its Go core, so the few lines of framing are here."""

import json
import shutil
import struct
import sys
import types

import pytest

import entrypoint
from trainer.config import load_config, to_yaml
from trainer.io.storage import open_storage
from trainer.training.runlog import RunLog

wandb = pytest.importorskip("wandb")


def wandb_records(path):
    """Every Record in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:header])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    i, chunks = header, b""
    while i + header <= len(data):
        if block - i % block < header:  # a block's tail too short for a chunk header is padding
            i += block - i % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[i:i + header])
        if kind == 0 and length == 0:
            break
        chunks += data[i + header:i + header + length]
        i += header + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def offline_run(wandb_dir, run_id: str, attempt: int):
    """(run record, {step: {key: value}}) of the attempt-th offline run (0 = the first) of run_id."""
    runs = sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}"))
    records = list(wandb_records(runs[attempt] / f"run-{run_id}.wandb"))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            assert r.history.step.num not in history, f"step {r.history.step.num} logged twice"
            history[r.history.step.num] = items
    return run, history


@pytest.fixture
def wandb_env(tmp_path, cli):
    return cli.env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"), WANDB_PROJECT="zh-tests",
                   WANDB_SILENT="true")


@pytest.mark.slow  # two tiny pretrain runs through the CLI, about 15 s each
def test_a_run_logs_every_row_to_wandb_and_a_resume_logs_no_step_twice(tmp_path, tiny_config, cli, metrics,
                                                                       wandb_env):
    cfg = tiny_config(tmp_path, {"run.id": "wb", "run.report_to": ["tensorboard", "wandb"]})
    path = cli.write_config(cfg, tmp_path / "tiny.yaml")
    r = cli.run("pretrain", path, env=wandb_env)
    assert r.returncode == 0, r.stdout[-4000:]
    store = open_storage(cfg.storage.bucket)
    rows = metrics(store, "wb")
    run, history = offline_run(tmp_path / "wandb", "wb", 0)
    assert (run.run_id, run.display_name, run.project, run.run_group) == ("wb", "wb", "zh-tests", "wb")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["train"]["max_steps"] == 8 and config["run"]["report_to"] == ["tensorboard", "wandb"]
    assert sorted(history) == [row["step"] for row in rows] == list(range(1, 9))
    for row in rows:
        logged = history[row["step"]]
        assert logged["train/loss"] == row["loss"] and logged["train/lr"] == row["lr"]
        assert logged["train/tok_per_s"] == row["tok_per_s"] and logged["train/tokens"] == row["tokens"]
        assert logged.get("val/loss") == row.get("val_loss")
    assert [s for s in history if "samples/_type" in history[s]] == [4, 8]  # a table at each checkpoint
    assert history[8]["samples/nrows"] == len(cfg.sample.prompts)

    # The job was killed after W&B had step 8 but before checkpoint 8 was published: the rerun resumes
    # from step 4 and trains 5-8 again (metrics.jsonl drops and rewrites them); W&B gets only 9-12.
    shutil.rmtree(tmp_path / "bucket/runs/wb/checkpoints/step-00000008")
    (tmp_path / "bucket/runs/wb/checkpoints/LATEST").write_text("step-00000004")
    r = cli.run("pretrain", path, {"train.max_steps": 12}, env=wandb_env)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "resumed from step-00000004" in r.stdout and "W&B: run wb holds steps up to 8" in r.stdout
    rows = metrics(store, "wb")
    assert [row["step"] for row in rows] == list(range(1, 13))
    _, resumed = offline_run(tmp_path / "wandb", "wb", 1)
    assert sorted(resumed) == [9, 10, 11, 12]
    assert [resumed[row["step"]]["train/loss"] for row in rows[8:]] == [row["loss"] for row in rows[8:]]


def test_report_to_wandb_without_wandb_installed_is_exit_2_before_anything_runs(tmp_path, monkeypatch, capsys):
    for name in ("CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed
    with pytest.raises(ImportError):
        import wandb as _  # noqa: F401
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["pretrain", "--run.report_to=[wandb]", f"--storage.bucket={tmp_path / 'bucket'}",
                         f"--storage.local_dir={tmp_path / 'work'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: invalid configuration:\n  run.report_to: wandb is not installed here: "
                   "pip install '.[wandb]', or leave wandb out of run.report_to\n")
    assert not (tmp_path / "bucket").exists() and not (tmp_path / "work").exists()
    # A config naming wandb still loads where it is only rebuilt or rendered for another machine (submit).
    assert load_config(None, {"run.report_to": ["wandb"]}, env={}).run.report_to == ("wandb",)


def test_report_to_names_only_what_it_knows():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"run.report_to\[1\]: 'mlflow' is not one of tensorboard, wandb"):
        load_config(None, {"run.report_to": ["wandb", "mlflow"]}, env={})


class FlakyRun:
    """A W&B run whose network goes away after two logs."""
    id, starting_step = "flaky", 0

    def __init__(self):
        self.logged = []

    def log(self, data, step=None, commit=None):
        if step == 3:
            raise ConnectionError("network is unreachable")
        self.logged.append((step, data))


def test_a_wandb_failure_mid_run_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    flaky = FlakyRun()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: flaky, Table=None))
    local = tmp_path / "work/runs/flaky"
    local.mkdir(parents=True)
    cfg = load_config(None, {"run.id": "flaky", "run.report_to": ["wandb"]}, env={})
    (local / "resolved.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    runlog = RunLog(open_storage(str(tmp_path / "bucket")), "flaky", local, 0, main=True)
    assert runlog.tb is None  # report_to without tensorboard: no event files
    for step in range(1, 6):
        runlog.append("metrics.jsonl", [{"step": step, "loss": 5.0 - step}])
        runlog.flush()
    assert [step for step, _ in flaky.logged] == [1, None, 2, None]  # each step, then its commit
    warnings = [r.message for r in caplog.records if "W&B" in r.message]
    assert len(warnings) == 1 and "logging step 3 failed (ConnectionError" in warnings[0]
    rows = [json.loads(line) for line in (tmp_path / "bucket/runs/flaky/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]


def test_logs_reach_the_bucket_between_checkpoints(tmp_path, monkeypatch):
    """metrics.jsonl and the TensorBoard events are uploaded at the first log step UPLOAD_EVERY_S
    after the last upload, not only at checkpoints (issue 25: TensorBoard in the bucket lagged a
    whole checkpoint interval)."""
    from trainer.training import runlog as runlog_module

    local = tmp_path / "work/runs/live"
    local.mkdir(parents=True)
    store = open_storage(str(tmp_path / "bucket"))
    clock = [1000.0]
    monkeypatch.setattr(runlog_module.time, "monotonic", lambda: clock[0])
    log = RunLog(store, "live", local, 0, main=True)
    log.append("metrics.jsonl", [{"step": 1, "loss": 5.0}])
    assert not store.exists("runs/live/metrics.jsonl")  # 0 s since the start: nothing uploaded yet
    clock[0] += runlog_module.UPLOAD_EVERY_S
    log.append("metrics.jsonl", [{"step": 2, "loss": 4.0}])
    rows = [json.loads(line) for line in store.read_text("runs/live/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [o.key for o in store.list("runs/live/tensorboard/")]  # the event file too
    clock[0] += 1.0
    log.append("metrics.jsonl", [{"step": 3, "loss": 3.0}])
    assert len(store.read_text("runs/live/metrics.jsonl").splitlines()) == 2  # 1 s later: not again
    log.close()
