"""Checkpoint samples from an FSDP model whose blocks are compiled one by one (issue 24): what the
loop's samples cost with dynamo left on ("compiled", before the fix) and under
torch.compiler.set_stance("force_eager") (what Checkpointer._save does since), and whether the
training steps after them recompile. One GPU, FSDP over a process group of one, bf16 as the loop
runs it; the model's shape, not its weights, matters (random init, random prompts: 3 prompts x
sample.max_new_tokens=64 tokens, sampled at the defaults, as sample.prompts are). Not part of the job.

    python bench/experiments/fsdp_samples.py --preset 1b --variant eager      # one process per variant
    python bench/experiments/fsdp_samples.py --preset 1b --variant compiled

Prints one JSON row: seconds of the first (compiling) step, of a compiled step, of the samples, of
the first step after them, and dynamo's graph count before and after the samples and after that step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.model.llama import build_model, llama_config  # noqa: E402
from trainer.parallel.fsdp import decoder_layers, ensure_process_group, materialize, shard, shard_root  # noqa: E402
from trainer.training.tasks import CausalLMLoss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--variant", choices=("compiled", "eager"), required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=1024)
    args = ap.parse_args()
    from torch._dynamo.utils import counters

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    ensure_process_group(device)
    config = llama_config(args.preset, 32000, args.seq_len)
    with torch.device("meta"):
        model = build_model(config, "sdpa")
    for layer in decoder_layers(model):  # as parallelize.prepare does under FSDP with compile
        layer.compile()
    shard(model, bf16=True)
    materialize(model, lambda: build_model(config, "sdpa"), device)
    loss_module = CausalLMLoss(model)
    shard_root(loss_module, bf16=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)

    def step() -> float:
        batch = torch.randint(0, 32000, (args.batch, args.seq_len + 1), device=device, generator=g)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            loss = loss_module(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    row = {"preset": args.preset, "variant": args.variant, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "first_step_s": step(), "step_s": min(step() for _ in range(3))}
    row["graphs_before_samples"] = counters["stats"]["unique_graphs"]
    stance = torch.compiler.set_stance("force_eager") if args.variant == "eager" else contextlib.nullcontext()
    model.eval()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with stance, torch.no_grad(), autocast:
        for _ in range(3):  # sample.prompts: three prompts, one at a time
            ids = torch.randint(0, 32000, (1, 6), device=device, generator=g)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=True,
                           temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1, synced_gpus=True)
    torch.cuda.synchronize()
    row["samples_s"] = time.perf_counter() - t
    model.train()
    row["graphs_after_samples"] = counters["stats"]["unique_graphs"]
    row["step_after_samples_s"] = step()
    row["graphs_after_next_step"] = counters["stats"]["unique_graphs"]
    print(json.dumps(row), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
