"""The experiment behind bench/RESULTS.md's "Why FSDP was 25% slower per GPU": ours at 1b, 16 x 1024,
one GPU, with one FSDP or compile setting changed per variant (by setting a module constant or
patching one function), each variant in its own process. Kept as it was run on 2026-11-30; not part
of the job. To reproduce that table, run it at commit f57b308, before the use_cache fix: on later
commits the per-block variants no longer recompile, and fsdp-ce's own forward (written before the
fix) builds the KV cache again.

    CUDA_VISIBLE_DEVICES=0 OUT=/tmp/gap-out python bench/experiments/fsdp_gap.py --workdir /tmp/gap \\
        --variants unsharded,fsdp,fsdp-ce,fsdp-noreshard,fsdp-bf16reduce,unsharded-perblock,fsdp-fullcompile

Appends one JSON row per variant to $OUT/fsdp_gap.jsonl; the prof-* variants also write a table of
CUDA kernels by total time to $OUT/<variant>.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_pretrain as bp  # noqa: E402

VARIANTS = ("unsharded", "fsdp", "fsdp-ce", "fsdp-noreshard", "fsdp-bf16reduce", "unsharded-perblock",
            "fsdp-fullcompile", "prof-fsdp", "prof-unsharded")


def _patch(variant: str) -> None:
    """Change the one setting the variant names, in this process."""
    from trainer.parallel import fsdp as sharding
    from trainer.training import parallelize, tasks
    if variant == "fsdp-noreshard":
        sharding.RESHARD_AFTER_FORWARD = False
    if variant == "fsdp-bf16reduce":
        sharding.REDUCE_DTYPE = torch.bfloat16
    if variant == "fsdp-ce":  # the loss tail (fp32 upcast + cross-entropy) compiled on its own
        ce = torch.compile(lambda logits, t: F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                             t.reshape(-1), reduction="sum"))

        def forward(self, batch):
            hidden = self.model.model(input_ids=batch[:, :-1]).last_hidden_state
            return ce(self.model.lm_head(hidden), batch[:, 1:])

        tasks.CausalLMLoss.forward = forward
    if variant == "unsharded-perblock":  # no FSDP; blocks compiled one by one as under FSDP, the rest eager
        def wrap(loss_module, d, compile_setting, strategy="ddp", bf16=False):
            for layer in sharding.decoder_layers(loss_module.model):
                layer.compile()
            return loss_module, loss_module

        parallelize.wrap = wrap
    if variant == "fsdp-fullcompile":  # FSDP, then the whole root compiled instead of each block
        parallelize.compiles = lambda *a: False

        def wrap(loss_module, d, compile_setting, strategy="ddp", bf16=False):
            sharding.shard_root(loss_module, bf16)
            return torch.compile(loss_module), loss_module

        parallelize.wrap = wrap


def one(variant: str, args) -> None:
    data_dir, tok_dir, index, cfg = bp.prepare_data(args)
    args.strategy = "ddp" if "unsharded" in variant else "fsdp"
    _patch(variant)
    out = Path(os.environ.get("OUT", "."))
    t0 = time.time()
    run = lambda: bp.bench_ours(args.preset, args.micro_batch, args, data_dir, tok_dir, index, cfg,  # noqa: E731
                                "on", variant)
    if variant.startswith("prof"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            row = run()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90)
        (out / f"{variant}.txt").write_text(table)
        row["kernel_seconds_total"] = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    else:
        row = run()
    row.update(variant=variant, wall_s=time.time() - t0)
    print("RESULT", json.dumps(row), flush=True)
    with open(out / "fsdp_gap.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workdir", required=True)
    p.add_argument("--preset", default="1b")
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    args = argparse.Namespace(corpus=str(ROOT / "data/sample/*.jsonl.zst"), vocab=32000, workdir=a.workdir,
                              seq_len=1024, steps=a.steps, warmup=a.warmup, strategy="fsdp", measure_only=True,
                              preset=a.preset, micro_batch=a.micro_batch)
    if a.one:
        return one(a.one, args)
    for v in a.variants.split(","):
        steps, warmup = (8, 4) if v.startswith("prof") else (a.steps, a.warmup)  # the loop warms up 10 steps
        r = subprocess.run([sys.executable, __file__, "--one", v, "--workdir", a.workdir, "--preset", a.preset,
                            "--micro_batch", str(a.micro_batch), "--steps", str(steps), "--warmup", str(warmup)])
        print(v, "exit", r.returncode, flush=True)


if __name__ == "__main__":
    main()
