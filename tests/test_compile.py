"""Blocks compiled one by one (what the loop does under FSDP, as torchtitan does) compile once for
all layers. A KV cache built during the training forward makes every layer's guards differ (the
cache's per-layer state), so dynamo recompiled per layer until its recompile limit (8) and ran the
remaining layers eager: FSDP at 1b ran at 51.7k tok/s instead of 64.1k on an H200
(bench/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch

from faults import copy_bucket, make_config, template, tiny_settings  # noqa: F401  (template: a fixture)
from trainer.model.llama import build_model, llama_config
from trainer.parallel.fsdp import decoder_layers
from trainer.training.tasks import CausalLMLoss, PackedLoss


def _batch(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 17), generator=g)
    if kind == "pretrain":
        return tokens
    positions = torch.arange(17).expand(2, 17)
    return torch.stack([tokens, tokens, positions], dim=-1)  # (B, T + 1, [token, label, position])


@pytest.mark.parametrize("kind,loss_cls", [("pretrain", CausalLMLoss), ("sft", PackedLoss)])
def test_per_block_compile_compiles_each_block_once(kind, loss_cls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(llama_config("tiny", 256, 16), "sdpa")
    assert len(decoder_layers(model)) >= 2  # a second layer is what would recompile
    loss_module = loss_cls(model)
    eager = loss_module(_batch(kind))
    for layer in decoder_layers(model):
        layer.compile()
    with torch._dynamo.config.patch(error_on_recompile=True):  # raises on any recompile
        for _ in range(2):
            loss = loss_module(_batch(kind))
            loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-4)


class _SampleCounter:
    """The pretraining task, counting the graphs dynamo compiles while checkpoint samples are taken
    (and during evaluation, whose no_grad forward is a graph of its own)."""

    def __init__(self, task):
        self.task, self.during_samples, self.before_samples, self.rows = task, [], [], []
        self.during_evaluation = 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def evaluate(self, loss_module, d, autocast):
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        row = self.task.evaluate(loss_module, d, autocast)
        self.during_evaluation += counters["stats"]["unique_graphs"] - before
        return row

    def at_checkpoint(self, model, tokenizer, step, autocast, synced=False):
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        rows = self.task.at_checkpoint(model, tokenizer, step, autocast, synced)
        self.before_samples.append(before)
        self.during_samples.append(counters["stats"]["unique_graphs"] - before)
        self.rows += rows
        return rows


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_samples_compile_nothing_and_training_keeps_its_graphs(strategy, template, tmp_path, in_process,
                                                                          monkeypatch):
    """train.compile=on, one process (FSDP: blocks compiled one by one, a gloo group of one): the
    samples at the checkpoints of steps 4 and 8 compile no graph (under FSDP, generate's KV cache
    recompiled every block until dynamo's limit, ~60 s a checkpoint at 1b: issue 24), and steps 5-8
    after the first samples run the graphs steps 1-4 compiled. Dynamo's "eager" backend: the same
    guards and recompiles as inductor's, without its code generation."""
    from torch._dynamo.utils import counters

    from trainer.io.artifacts import Artifacts
    from trainer.training import parallelize
    from trainer.training.worker import pretrain_task, run_task

    monkeypatch.setattr(parallelize, "COMPILE_BACKEND", "eager")
    copy_bucket(template, tmp_path / "bucket")
    cfg = make_config(tiny_settings(template["corpus"], str(tmp_path / "bucket"), str(tmp_path / "work"), **{
        "train.max_steps": 8, "train.compile": "on", "train.strategy": strategy, "checkpoint.upload_async": False,
        "sample.prompts": ["床前", "明月"]}))
    arts = Artifacts(template["tokenizer_key"], template["data_key"])
    torch._dynamo.reset()
    counters.clear()
    counted = []
    state = run_task(cfg, lambda: counted.append(_SampleCounter(pretrain_task(cfg, arts))) or counted[0])
    task = counted[0]
    assert state["step"] == 8 and len(task.rows) == 4  # two prompts at steps 4 and 8
    assert task.before_samples[0] > 0  # training compiled its graphs before the first samples
    assert task.during_samples == [0, 0]
    # Steps 5-8 compiled nothing new: every graph after the first samples is the evaluation's (at step 8).
    assert counters["stats"]["unique_graphs"] == task.before_samples[0] + task.during_evaluation
