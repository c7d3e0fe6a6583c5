#!/usr/bin/env python3
"""Pretraining throughput: transformers.Trainer (what users run today) vs our `pretrain` loop,
same model shapes, same packed token shards, same card, one process, one run.

    python scripts/bench_pretrain.py --models 124m:32,350m:16 --steps 30
    python scripts/bench_pretrain.py --scaling 1,2,4 --models 124m:32      # DDP efficiency
    python scripts/bench_pretrain.py --models 1b:16:8 --variants hf,compile,fp8   # ours at 16, Trainer at 8
    python scripts/bench_pretrain.py --scaling 1,2,4,8 --strategy fsdp --models 1b:16
    python scripts/bench_pretrain.py --models 7b:4 --variants compile --measure_only --tag 7b-ddp   # does it fit?
    python scripts/bench_pretrain.py --models 124m:32 --variants hf,compile,muon,muon-torch   # Muon vs AdamW
    python scripts/bench_pretrain.py --models 1b:8 --accum 16 --variants compile,muon --measure_only  # 131k-token steps

Prints a table (tok/s, MFU, peak memory, data-wait fraction, ratio to the baseline) and writes
JSON under bench/results/. Ours runs through trainer.training.loop.train() (via
trainer.training.worker), what `run` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prepare_data(args) -> tuple[Path, Path, dict, object]:
    """Tokenizer + packed shards from the given corpus, through the job's own stages."""
    from trainer.config import load_config
    from trainer.io.artifacts import bucket, fetch_folder
    from trainer.job.stages import stage_prepare

    work = Path(args.workdir)
    cfg = load_config(None, {"data.sources": args.corpus, "tokenizer.vocab_size": args.vocab,
                             "tokenizer.sample_bytes": 50_000_000, "storage.bucket": str(work / "bucket"),
                             "storage.local_dir": str(work / "local")}, env={})
    arts = stage_prepare(cfg)
    store = bucket(cfg)
    data_dir = fetch_folder(store, arts.data_key, work / "local")
    tok_dir = fetch_folder(store, arts.tokenizer_key, work / "local")
    index = json.loads((data_dir / "index.json").read_text())
    return data_dir, tok_dir, index, cfg


def mfu_of(tok_s: float, preset: str, vocab: int, seq_len: int, gpus: int = 1) -> float | None:
    import torch

    from trainer.model.llama import PRESETS, flops_per_token, padded_vocab, peak_flops

    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    if not peak:
        return None
    return tok_s * flops_per_token(PRESETS[preset], padded_vocab(vocab), seq_len) / (peak * gpus)


def bench_hf_trainer(preset: str, batch: int, args, data_dir: Path, index: dict) -> dict:
    """transformers.Trainer on LlamaForCausalLM: bf16, adamw_torch_fused, SDPA (GPU_NOTES baseline)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainer.data.loader import TokenSamples
    from trainer.model.llama import build_model, llama_config

    samples = TokenSamples(data_dir, index, "train", args.seq_len)

    class Packed(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            ids = torch.from_numpy(samples.get([i])[0, :-1])
            return {"input_ids": ids, "labels": ids}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    torch.manual_seed(0)
    model = build_model(llama_config(preset, index["vocab_size"], args.seq_len), "sdpa")
    gpu = torch.cuda.is_available()  # CPU: a smoke test of the script (fp32, no memory figures)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=args.warmup + args.steps,
        bf16=gpu, optim="adamw_torch_fused" if gpu else "adamw_torch", learning_rate=3e-4, weight_decay=0.1,
        warmup_steps=10, gradient_accumulation_steps=args.accum,
        lr_scheduler_type="cosine", logging_steps=10_000, save_strategy="no", report_to=[],
        dataloader_num_workers=2, dataloader_pin_memory=True, disable_tqdm=True, max_grad_norm=1.0)
    Trainer(model=model, args=targs, train_dataset=Packed(), callbacks=[Clock()]).train()
    steps = [b - a for a, b in zip(times[args.warmup:], times[args.warmup + 1:])]
    tok_s = batch * args.accum * args.seq_len / statistics.median(steps)
    out = {"setup": "transformers.Trainer", "batch": batch, "tok_per_s": tok_s,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else 0.0,
           "data_wait": None, "mfu": mfu_of(tok_s, preset, index["vocab_size"], args.seq_len)}
    del model
    if gpu:
        torch.cuda.empty_cache()
    return out


def bench_ours(preset: str, batch: int, args, data_dir: Path, tok_dir: Path, index: dict, base_cfg,
               compile_mode: str, label: str, nproc: int = 1, muon_impl: str = "batched", **settings) -> dict:
    """trainer.training.loop.train() with the given settings (the job's worker; `settings`: more train.*
    keys, e.g. float8=True); tok/s is the median logged window after warm-up. muon_impl: "torch" runs
    train.optimizer=muon on torch.optim.Muon (optim.MUON_IMPL; one process only)."""
    import torch

    from trainer.config import replace
    from trainer.training import optim

    if not torch.cuda.is_available():
        compile_mode = "off"  # CPU: a smoke test of the script, not a measurement
    run_id = f"bench-{preset}-{label}-{nproc}".replace(" ", "").replace(",", "").replace("+", "-")
    log_every = 5
    cfg = replace(base_cfg, **{
        "run.id": run_id, "model.preset": preset, "train.seq_len": args.seq_len,
        "train.batch_tokens": batch * args.seq_len * nproc * args.accum, "train.micro_batch_size": batch,
        "train.max_steps": args.warmup + args.steps, "train.lr": 3e-4,
        "train.warmup_steps": min(10, args.warmup + args.steps - 1),
        "train.log_every_steps": log_every, "train.eval_every_steps": 0, "train.eval_sequences": 16,
        "train.checkpoint_every_steps": 10_000, "train.compile": compile_mode, "train.strategy": args.strategy,
        "checkpoint.upload_async": False, **{f"train.{k}": v for k, v in settings.items()}})
    if nproc == 1:
        from trainer.training.checkpointer import Checkpointer
        from trainer.training.tasks import PretrainTask

        if args.measure_only:  # no final checkpoint (7b + AdamW state: 81 GB) and no final validation
            Checkpointer._save = lambda *a, **k: None
            PretrainTask.evaluate = lambda *a, **k: {}
        from trainer.training.worker import run_task

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        optim.MUON_IMPL = muon_impl
        try:
            run_task(cfg, lambda: PretrainTask(cfg, data_dir, index, tok_dir))
        finally:
            optim.MUON_IMPL = "batched"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        from trainer.config import to_yaml

        path = Path(args.workdir) / f"{run_id}.yaml"
        path.write_text(to_yaml(cfg))
        arts_path = Path(args.workdir) / "artifacts.json"
        pythonpath = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))  # a bare checkout too
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "trainer.training.worker", "--stage=pretrain", f"--config={path}",
                        f"--artifacts={arts_path}"], check=True, env={**os.environ, "PYTHONPATH": pythonpath})
    metrics = Path(cfg.storage.local_dir) / "runs" / run_id / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    import shutil

    for folder in (Path(cfg.storage.local_dir) / "runs" / run_id, Path(cfg.storage.bucket) / "runs" / run_id):
        shutil.rmtree(folder, ignore_errors=True)  # a 1b checkpoint is 15 GB: the disk holds few
    # A logged tok/s is the mean over the log_every steps before it: only windows that start after the
    # warm-up are steady (with --warmup 4, the window of steps 1-5 holds compilation).
    steady = [r for r in rows if r["step"] - log_every >= args.warmup]
    if not steady:
        raise SystemExit(f"--steps {args.steps}: no whole {log_every}-step window after --warmup {args.warmup}; "
                         f"use --steps >= {-(-(args.warmup + log_every) // log_every) * log_every - args.warmup}")
    tok_s = statistics.median(r["tok_per_s"] for r in steady)
    return {"setup": f"ours ({label})", "tok_per_s": tok_s, "gpus": nproc, "strategy": args.strategy, **settings,
            "peak_mem_gb": max(r.get("peak_mem_gb", 0) for r in rows),
            "data_wait": statistics.median(r["data_wait"] for r in steady),
            "mfu": mfu_of(tok_s, preset, index["vocab_size"], args.seq_len, nproc),
            "final_loss": rows[-1]["loss"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="124m:32,350m:16",
                   help="preset:batch per GPU[:Trainer's batch if other], comma separated")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps (compile, allocator)")
    p.add_argument("--corpus", default=str(ROOT / "data/sample/*.jsonl.zst"))
    p.add_argument("--variants", default="hf,eager,compile",
                   help="hf, eager, compile, fp8 (compile + train.float8), ac (compile + activation checkpointing), "
                        "muon (compile + train.optimizer=muon, BatchedMuon), muon-torch (the same on torch.optim.Muon)")
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimizer step in ours (gradient accumulation): the global batch is "
                        "batch x seq_len x GPUs x accum; tok/s counts every micro-batch")
    p.add_argument("--scaling", default="", help="GPU counts for scaling of ours, e.g. 1,2,4,8")
    p.add_argument("--strategy", default="auto", help="train.strategy of ours: auto, ddp, fsdp (1 GPU: unsharded)")
    p.add_argument("--measure_only", action="store_true",
                   help="ours on one GPU: skip the final checkpoint and validation (for models whose checkpoint "
                        "outgrows the disk; a run that does not fit fails with torch.OutOfMemoryError)")
    p.add_argument("--tag", default="", help="added to the JSON file's name (several runs on one day)")
    p.add_argument("--workdir", default=tempfile.mkdtemp(prefix="bench-pretrain-"))
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    args = p.parse_args()

    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"  # cpu: a smoke test
    data_dir, tok_dir, index, base_cfg = prepare_data(args)
    (Path(args.workdir) / "artifacts.json").write_text(json.dumps({
        "tokenizer_key": str(tok_dir.relative_to(Path(base_cfg.storage.local_dir))),
        "data_key": str(data_dir.relative_to(Path(base_cfg.storage.local_dir)))}))
    results = []
    variants = args.variants.split(",")
    for spec in args.models.split(","):
        preset, batch, *hf_batch = spec.split(":")
        batch = int(batch)
        rows = []
        if args.scaling:
            for n in (int(x) for x in args.scaling.split(",")):
                rows.append(bench_ours(preset, batch, args, data_dir, tok_dir, index, base_cfg, "on", "compile", n))
        else:
            if "hf" in variants:
                rows.append(bench_hf_trainer(preset, int(hf_batch[0]) if hf_batch else batch, args, data_dir, index))
            if "eager" in variants:
                rows.append(bench_ours(preset, batch, args, data_dir, tok_dir, index, base_cfg, "off", "eager"))
            if "compile" in variants:
                rows.append(bench_ours(preset, batch, args, data_dir, tok_dir, index, base_cfg, "on", "compile"))
            if "fp8" in variants:
                rows.append(bench_ours(preset, batch, args, data_dir, tok_dir, index, base_cfg, "on", "compile+fp8",
                                       float8=True))
            if "muon" in variants:
                rows.append(bench_ours(preset, batch, args, data_dir, tok_dir, index, base_cfg, "on", "compile+muon",
                                       optimizer="muon"))
            if "muon-torch" in variants:
                rows.append(bench_ours(preset, batch, args, data_dir, tok_dir, index, base_cfg, "on",
                                       "compile+muon-torch", muon_impl="torch", optimizer="muon"))
            if "ac" in variants:
                rows.append(bench_ours(preset, batch, args, data_dir, tok_dir, index, base_cfg, "on", "compile+ac",
                                       activation_checkpointing=True))
        base = rows[0]["tok_per_s"]
        for r in rows:
            r.setdefault("batch", batch)
            r.update(model=preset, seq_len=args.seq_len, accum=args.accum, vocab=index["vocab_size"],
                     ratio=r["tok_per_s"] / base)
            if args.scaling:
                r["scaling_efficiency"] = r["tok_per_s"] / (base * r["gpus"])
        results += rows

    print(f"\n{card}, torch {torch.__version__}, seq {args.seq_len}, vocab {index['vocab_size']}, "
          f"{args.accum} micro-batch(es) per step, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'model':6} {'batch':>5} {'setup':26} {'gpus':>4} {'tok/s':>10} {'MFU':>6} {'peak GB':>8} "
          f"{'data wait':>9} {'ratio':>6}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        wait = f"{100 * r['data_wait']:.2f}%" if r.get("data_wait") is not None else "-"
        print(f"{r['model']:6} {r['batch']:>5} {r['setup']:26} {r.get('gpus', 1):>4} {r['tok_per_s']:>10,.0f} "
              f"{mfu:>6} {r['peak_mem_gb']:>8.1f} {wait:>9} {r['ratio']:>5.2f}x")
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    tag = "scaling" if args.scaling else "pretrain"
    name = f"{tag}-{card.replace(' ', '_')}-{time.strftime('%Y-%m-%d')}{'-' + args.tag if args.tag else ''}.json"
    (out / name).write_text(json.dumps({"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                        "command": " ".join(sys.argv), "results": results}, indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
