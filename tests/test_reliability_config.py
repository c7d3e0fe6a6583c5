"""Bad configuration through the CLI: every invalid value is reported with its key, at once, with
exit 2, before anything is downloaded, written or started (the S3 endpoint sees no request)."""

from __future__ import annotations

from faults import FaultProxy, cli_args, run, s3_prefix, s3_server, tiny_settings, write_config  # noqa: F401


def test_every_invalid_value_is_reported_with_its_key_before_any_work(s3_server, tmp_path):
    with FaultProxy(s3_server) as proxy:  # counts the requests that reach "S3"
        config = write_config(tmp_path / "c.yaml", tiny_settings(str(tmp_path / "corpus.jsonl"), s3_prefix(),
                                                                  str(tmp_path / "work"), proxy.url))
        bad = {"train.lr": "2", "train.max_steps": "0", "data.on_error": "maybe", "storage.retries": "many",
               "model.preset": "huge", "train.on_nonfinite": "ignore", "train.spike_factor": "0.5",
               "storage.timeout_seconds": "0", "run.lease_seconds": "3", "train.grace_seconds": "-1",
               "checkpoint.upload_async": "perhaps", "nonsense.key": "1", "train.nonsense": "1"}
        result = run(cli_args("run", f"--config={config}", *[f"--{k}={v}" for k, v in bad.items()]), timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    message = result.stdout[result.stdout.index("error: invalid configuration"):]
    for key in bad:
        assert f"\n  {key}: " in message, (key, message)
    assert sum(proxy.requests.values()) == 0  # nothing listed, downloaded or uploaded
    assert not (tmp_path / "work").exists()
    assert "Traceback" not in result.stdout


def test_a_batch_that_does_not_split_over_the_processes_is_reported_before_any_download(s3_server, tmp_path):
    with FaultProxy(s3_server) as proxy:
        config = write_config(tmp_path / "c.yaml", tiny_settings(str(tmp_path / "corpus.jsonl"), s3_prefix(),
                                                                  str(tmp_path / "work"), proxy.url))
        result = run(cli_args("run", f"--config={config}", "--train.nproc=3"), timeout=120)  # 8 sequences / 3
    assert result.returncode == 2, result.stdout[-3000:]
    assert "error: invalid configuration:\n  train.batch_tokens: the global batch of 8 sequences does not split " \
           "evenly over 3 processes" in result.stdout
    assert sum(proxy.requests.values()) == 0 and not (tmp_path / "work").exists()
