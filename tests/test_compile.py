"""Blocks compiled one by one (what the loop does under FSDP, as torchtitan does) compile once for
all layers. A KV cache built during the training forward makes every layer's guards differ (the
cache's per-layer state), so dynamo recompiled per layer until its recompile limit (8) and ran the
remaining layers eager: FSDP at 1b ran at 51.7k tok/s instead of 64.1k on an H200
(bench/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch

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
