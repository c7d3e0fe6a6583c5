"""Flaky and failing object storage, through a fault-injecting proxy in front of the loopback S3
server: retries with backoff carry a whole job through 5xx answers, connection resets, cut-off
bodies and stalls; a failure that persists ends with an error naming the URL, with nothing
half-written published (no index.json, MANIFEST.json or LATEST for a partial upload). And the
asynchronous checkpoint upload: training goes on meanwhile, one upload at most, failures raised.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from faults import (  # noqa: F401
    FaultProxy,
    cli_args,
    in_process,
    make_config,
    run,
    s3_prefix,
    s3_server,
    template,
    tiny_settings,
    train_in_process,
    upload_bucket,
)
from trainer.io.storage import StorageError, open_storage
from trainer.state import protocol


def test_a_job_completes_through_flaky_storage_in_every_phase(template, s3_server, tmp_path):
    root = s3_prefix()
    rules = [  # each phase meets at least these faults, on top of the random ones
        (r"GET .*/corpus/poems\.jsonl", "cut", 1),  # pull: the body stops half way
        (r"PUT .*/data/[0-9a-f]+/train-00001\.bin", "503", 2),  # shard upload
        (r"PUT .*/checkpoints/step-\d+/model\.safetensors", "reset", 1),  # checkpoint upload
        (r"PUT .*/checkpoints/step-\d+/MANIFEST\.json", "500", 1),
        (r"PUT .*/checkpoints/LATEST", "stall", 1),  # longer than storage.timeout_seconds
    ]
    with FaultProxy(s3_server, rate=0.1, kinds=("500", "503", "reset", "cut"), rules=rules, stall_seconds=3,
                    seed=7) as proxy:
        source = open_storage(f"{root}/corpus", make_config(tiny_settings("x", root, "x", s3_server)).storage)
        source.upload_file(template["corpus"], "poems.jsonl")
        settings = tiny_settings(f"{root}/corpus/poems.jsonl", f"{root}/out", str(tmp_path / "work"), proxy.url,
                                 **{"storage.retries": 5, "storage.timeout_seconds": 2, "train.max_steps": 8})
        config = tmp_path / "flaky.yaml"
        from faults import write_config

        write_config(config, settings)
        result = run(cli_args("run", f"--config={config}"), timeout=300)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:]
    assert all(rule[2] == 0 for rule in proxy.rules), proxy.rules  # every planned fault happened
    print(f"requests {dict(proxy.requests)}, faults injected {dict(proxy.injected)}")
    assert sum(proxy.injected.values()) >= 10
    store = open_storage(f"{root}/out", make_config({**settings, "storage.endpoint_url": s3_server}).storage)
    assert protocol.complete_steps(store, "rel")[0] == 8 and store.exists(f"runs/rel/final/{protocol.MANIFEST}")


def direct(settings: dict, endpoint: str):
    """The job's bucket, reached without the proxy."""
    return open_storage(settings["storage.bucket"], make_config({**settings, "storage.endpoint_url": endpoint}).storage)


def s3_settings(template, endpoint: str, tmp_path: Path, **overrides) -> dict:
    return tiny_settings(template["corpus"], s3_prefix(), str(tmp_path / "work"), endpoint,
                         **{"storage.retries": 2, **overrides})


def test_persistent_failure_during_pull_names_the_url_and_leaves_no_partial_file(template, s3_server, tmp_path):
    """A copy (pull: what the report stage's held-out read uses) and a ranged read into a partial
    copy (remote.fetch_ranges: what prepare and the tokenizer's sample use; stage_pull leaves S3
    files in the bucket) both fail naming the URL and leave nothing behind."""
    from trainer.data.remote import Remote, fetch_ranges
    from trainer.data.sources import pull, resolve_sources

    with FaultProxy(s3_server, rate=1.0, kinds=("503",), match=r"GET .*/corpus/") as proxy:
        settings = s3_settings(template, proxy.url, tmp_path)
        root = settings["storage.bucket"]
        open_storage(root, make_config(settings).storage).upload_file(template["corpus"], "corpus/poems.jsonl")
        settings["data.sources"] = [f"{root}/corpus/poems.jsonl"]
        cfg = make_config(settings)
        files = resolve_sources(cfg)
        with pytest.raises(StorageError, match=re.escape(f"{root}/corpus/poems.jsonl") + ".*failed after 2 attempt"):
            pull(cfg, files)
        with pytest.raises(StorageError, match=re.escape(f"{root}/corpus/poems.jsonl") + ".*failed after 2 attempt"):
            fetch_ranges(files[0], Remote(cfg.storage, tmp_path / "work" / "parts"), [(0, 1000)])
    assert proxy.injected["503"] >= 4
    assert not [p for p in (tmp_path / "work").rglob("*") if p.is_file()]  # no partial download left


def test_persistent_failure_during_shard_upload_publishes_no_index(template, s3_server, tmp_path):
    from trainer.job.stages import stage_prepare

    with FaultProxy(s3_server, rate=1.0, kinds=("500", "reset"), match=r"PUT .*/data/[0-9a-f]+/train-00002") as proxy:
        settings = s3_settings(template, proxy.url, tmp_path)
        with pytest.raises(StorageError, match=r"upload to s3://.*/data/[0-9a-f]+/train-00002\.bin failed"):
            stage_prepare(make_config(settings))
    keys = [o.key for o in direct(settings, s3_server).list("")]
    assert any(re.search(r"data/[0-9a-f]+/train-00001\.bin", k) for k in keys)  # uploaded before the failure
    assert not [k for k in keys if k.endswith("index.json")]  # ... but the folder never counts
    assert [k for k in keys if k.endswith(f"tokenizers/{template['tokenizer_key'].split('/')[1]}/{protocol.MANIFEST}")]


def test_persistent_checkpoint_upload_failure_fails_the_run_and_publishes_nothing_partial(
        template, s3_server, tmp_path, in_process):
    with FaultProxy(s3_server, rate=1.0, kinds=("503",), match=r"PUT .*/checkpoints/step-00000008/optimizer") as proxy:
        settings = s3_settings(template, proxy.url, tmp_path, **{"train.max_steps": 16})
        store = direct(settings, s3_server)
        upload_bucket(template, store)
        with pytest.raises(StorageError, match=r"checkpoint upload failed: upload to s3://.*step-00000008/optimizer"):
            train_in_process(settings, template)  # the upload runs in the background: raised at the next one
    assert proxy.injected["503"] >= 2
    prefix = protocol.checkpoints_prefix("rel")
    assert store.exists(f"{prefix}/step-00000008/model.safetensors")  # partly uploaded ...
    assert protocol.complete_steps(store, "rel") == [4]  # ... but without a manifest it does not count
    assert store.read_text(f"{prefix}/{protocol.LATEST}").strip() == "step-00000004"


def test_a_stalled_request_times_out_and_is_retried(template, s3_server, tmp_path):
    with FaultProxy(s3_server, rules=[(r"GET .*/stalled\.txt", "stall", 1)], stall_seconds=4) as proxy:
        settings = s3_settings(template, proxy.url, tmp_path, **{"storage.timeout_seconds": 1})
        store = open_storage(settings["storage.bucket"], make_config(settings).storage)
        store.write_text("stalled.txt", "床前明月光")
        start = time.time()
        assert store.read_text("stalled.txt") == "床前明月光"
        assert 1 <= time.time() - start < 4  # the read timed out after 1 s and the retry answered
    assert proxy.injected["stall"] == 1


# Asynchronous checkpoint upload -----------------------------------------------------------------

class SlowStore:
    """Enough of a Storage for protocol.publish, with slow uploads that count how many overlap."""

    def __init__(self, root: Path, delay: float, fail_key: str = ""):
        self.inner = open_storage(str(root))
        self.delay, self.fail_key = delay, fail_key
        self.active = self.most_active = 0
        self.lock = threading.Lock()

    def upload_file(self, local_path, key):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(self.delay)
            if self.fail_key and self.fail_key in key:
                raise StorageError(f"upload to {self.inner.url(key)} failed after 8 attempt(s): injected")
            self.inner.upload_file(local_path, key)
        finally:
            with self.lock:
                self.active -= 1

    def upload_dir(self, local_dir, prefix, skip=()):
        for p in sorted(Path(local_dir).iterdir()):
            if p.name not in skip:
                self.upload_file(p, f"{prefix}/{p.name}")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def staged(tmp_path: Path, step: int) -> Path:
    d = tmp_path / "staged" / protocol.step_name(step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w" * 100)
    (d / "trainer_state.json").write_text('{"step": %d}' % step)
    protocol.write_manifest(d, step)
    return d


def test_uploader_runs_in_the_background_one_at_a_time(tmp_path):
    store = SlowStore(tmp_path / "bucket", delay=0.3)
    up = protocol.Uploader(store, "r", keep_last=5)
    one, two = staged(tmp_path, 1), staged(tmp_path, 2)
    start = time.time()
    up.submit(one, 1)
    assert time.time() - start < 0.25  # returns at once: training goes on while it uploads (3 x 0.3 s)
    up.submit(two, 2)  # waits for the first: never two in flight
    assert time.time() - start >= 3 * 0.3
    up.wait()
    assert store.most_active == 1
    assert protocol.complete_steps(store.inner, "r") == [2, 1]


def test_uploader_failure_is_raised_at_the_next_checkpoint_never_swallowed(tmp_path):
    store = SlowStore(tmp_path / "bucket", delay=0.05, fail_key="step-00000002/trainer_state")
    up = protocol.Uploader(store, "r", keep_last=5)
    up.submit(staged(tmp_path, 1), 1)
    up.submit(staged(tmp_path, 2), 2)  # fails in the background
    with pytest.raises(StorageError, match="checkpoint upload failed: upload to .*step-00000002/trainer_state"):
        up.submit(staged(tmp_path, 3), 3)
    up.wait()  # reported once, not again
    assert protocol.complete_steps(store.inner, "r") == [1]
    assert store.inner.read_text("runs/r/checkpoints/LATEST") == "step-00000001"


def test_training_continues_while_a_checkpoint_uploads(template, s3_server, tmp_path, in_process, caplog):
    stall = 2.0
    rules = [(r"PUT .*/checkpoints/step-00000004/model\.safetensors", "stall", 1)]
    with FaultProxy(s3_server, rules=rules, stall_seconds=stall) as proxy:
        settings = s3_settings(template, proxy.url, tmp_path, **{"train.max_steps": 12, "storage.timeout_seconds": 10})
        upload_bucket(template, direct(settings, s3_server))
        train_in_process(settings, template)
    out = caplog.text
    assert proxy.injected["stall"] == 1
    # Steps 5-8 ran (and step 8 was logged) while step 4's upload was stalled.
    assert out.index("pretrain step 8/12 ") < out.index("checkpoint step-00000004 published")
