"""The whole job through the CLI: `entrypoint.py run` on the tiny config, torchrun on CPU (gloo)."""

import json
import math
import os

import pytest
import torch
import yaml

from trainer.config import load_config_tree
from trainer.io.storage import open_storage
from trainer.state import protocol

pytestmark = pytest.mark.slow

# One format for every stage: a Hugging Face folder (config, generation config, weights, tokenizer) and
# the training files.
CHECKPOINT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json",
                    "optimizer.pt", "trainer_state.json", "rng.pt", "config.yaml", "MANIFEST.json"}


def ok(result):
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


def check_metrics(rows: list[dict], max_steps: int, eval_steps: list[int]):
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))  # log_every_steps=1, no duplicates
    for r in rows:
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["grad_norm"] > 0 and r["tok_per_s"] > 0
        assert r["tokens"] == r["step"] * 256
    assert [r["step"] for r in rows if "val_loss" in r] == eval_steps
    assert all(math.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1  # it learns something in a few steps


def check_export(store, run_id: str, tmp_path):
    """final/ loads with transformers, holds the newest checkpoint's weights, and generates."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "final"
    store.download_dir(f"runs/{run_id}/final", final)
    model = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    newest = protocol.complete_steps(store, run_id)[0]
    store.download_file(f"{protocol.checkpoints_prefix(run_id)}/{protocol.step_name(newest)}/model.safetensors",
                        tmp_path / "ckpt.st")
    trained = load_file(str(tmp_path / "ckpt.st"))
    exported = model.state_dict()
    assert set(trained) == set(exported)
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    ids = tok("床前明月光", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 6
    assert tok.decode(out[0], skip_special_tokens=True).startswith("床前明月光")
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template
    # The model card: Hugging Face metadata, then what trained for how long, from this run's own files.
    card = (final / "README.md").read_text(encoding="utf-8")
    state = json.loads(store.read_text(f"{protocol.checkpoints_prefix(run_id)}/{protocol.step_name(newest)}/"
                                       "trainer_state.json"))
    assert card.startswith("---\nlanguage:\n- zh\n") and "pipeline_tag: text-generation" in card
    assert f"| optimizer steps | {state['step']:,} |" in card and f"| tokens seen | {state['tokens_seen']:,} |" in card
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params / 1e6:.1f} M parameters" in card and "## Scores" in card


def test_run_on_two_processes_then_rerun_skips_every_stage(tmp_path, tiny_config, cli, metrics):
    cfg = tiny_config(tmp_path, {"run.id": "two", "checkpoint.keep_last": 1})
    path = cli.write_config(cfg, tmp_path / "tiny.yaml")
    out = ok(cli.run("run", path, {"train.nproc": 2}))
    assert "on 2 x cpu" in out and "starting from scratch" in out
    store = open_storage(cfg.storage.bucket)
    check_metrics(metrics(store, "two"), 8, eval_steps=[4, 8])
    # Checkpoints at 4 and 8; keep_last=1 pruned step 4 entirely.
    assert protocol.complete_steps(store, "two") == [8]
    assert store.list("runs/two/checkpoints/step-00000004/") == []
    assert store.read_text("runs/two/checkpoints/LATEST") == "step-00000008"
    files = {o.key.rsplit("/", 1)[1] for o in store.list("runs/two/checkpoints/step-00000008/")}
    assert files == CHECKPOINT_FILES
    state = json.loads(store.read_text("runs/two/checkpoints/step-00000008/trainer_state.json"))
    assert state["step"] == 8 and state["world_size"] == 2 and state["tokens_seen"] == 8 * 256
    store.download_file("runs/two/checkpoints/step-00000008/rng.pt", tmp_path / "rng.pt")
    assert len(torch.load(tmp_path / "rng.pt", weights_only=False)) == 2  # every rank's RNG state
    saved = load_config_tree(yaml.safe_load(store.read_text("runs/two/config.yaml")))
    assert saved.train.nproc == 2 and saved.run.id == "two" and saved.train.seq_len == cfg.train.seq_len
    check_export(store, "two", tmp_path)
    assert "samples from the exported model" in out and "--- 床前明月光" in out
    metrics_before = store.read_bytes("runs/two/metrics.jsonl")

    again = ok(cli.run("run", path, {"train.nproc": 2}))
    for line in ("tokenizer: reusing", "prepare: reusing", "pretrain: step-00000008 is published",
                 "export: " + store.url("runs/two/final") + " is up to date"):
        assert line in again, f"missing {line!r} in:\n{again[-4000:]}"
    assert "torch.distributed.run" not in again and "tokenizer: training" not in again
    assert store.read_bytes("runs/two/metrics.jsonl") == metrics_before


def test_run_against_s3(tmp_path, tiny_config, tiny_corpus, new_s3_bucket, cli, metrics):
    """One process, corpus and outputs in the bucket on the moto server; no credential is written."""
    bucket = new_s3_bucket()
    store = bucket.open()
    store.upload_file(tiny_corpus, "corpus/poems.jsonl")
    cfg = tiny_config(tmp_path, {"run.id": "s3run", "train.max_steps": 4,
                                 "data.sources": [store.url("corpus/*.jsonl")]}, bucket=bucket)
    path = cli.write_config(cfg, tmp_path / "tiny.yaml")
    out = ok(cli.run("run", path, {"train.nproc": 1}))
    assert "on 1 x cpu" in out and "pull: 1 corpus file(s)" in out
    check_metrics(metrics(store, "s3run"), 4, eval_steps=[4])
    assert protocol.complete_steps(store, "s3run") == [4]
    assert store.read_text("runs/s3run/checkpoints/LATEST") == "step-00000004"
    check_export(store, "s3run", tmp_path)
    # Credentials are read by boto3 from the environment and never logged or stored.
    secret = "test-secret-do-not-log"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret
    assert secret not in out and os.environ["AWS_ACCESS_KEY_ID"] not in out
    for o in store.list(""):
        assert secret.encode() not in store.read_bytes(o.key), o.key
