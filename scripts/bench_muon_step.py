#!/usr/bin/env python3
"""One optimizer step over a preset's hidden matrices (the decoder's attention and MLP weights,
Muon's share): torch.optim.Muon (matrix by matrix, plus the copy-and-restore the loop's exact
non-finite skip needed for it), our BatchedMuon (one batched Newton-Schulz per shape, skip on the
device; eager and compiled) and fused AdamW (found_inf), same
matrices, fp32 weights and gradients.

    python scripts/bench_muon_step.py --preset 124m --steps 50
    python scripts/bench_muon_step.py --preset 124m --steps 50 --profile    # + each setup's top kernels
    python scripts/bench_muon_step.py --preset tiny --steps 5 --device cpu     # a smoke test

Prints a table (median ms per step) and writes JSON to $OUT or --out. Needs torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def hidden_matrices(preset: str, vocab: int, seq_len: int, device):
    """Parameters shaped like the preset's hidden matrices, each with a random gradient."""
    import torch

    from trainer.model.llama import build_model, llama_config

    with torch.device("meta"):
        model = build_model(llama_config(preset, vocab, seq_len), "sdpa")
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n]
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


def torch_muon_step(opt, params, found_inf):
    """torch.optim.Muon as optim.MuonAdamW stepped it before BatchedMuon: keep a copy, step, restore
    where found_inf is set."""
    import torch

    before = [(p, p.detach().clone(), opt.state[p]["momentum_buffer"].clone() if p in opt.state else None)
              for p in params]
    opt.step()
    skip = found_inf > 0
    with torch.no_grad():
        for p, weight, buf in before:
            p.copy_(torch.where(skip, weight, p))
            new = opt.state[p]["momentum_buffer"]
            new.copy_(torch.where(skip, buf if buf is not None else torch.zeros_like(new), new))


def timed(step, steps: int, warmup: int, device) -> float:
    """Median milliseconds of step() over `steps` calls after `warmup`."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def setups(params, kw: dict, found_inf, device) -> list[tuple[str, object]]:
    """(name, step function) of each optimizer over the same matrices. "per shape" puts each shape in
    a param group of its own (BatchedMuon batches within a group: the same calls as "ours", a check of
    the grouping's cost); "compiled" is what the job runs on CUDA (optim.MuonAdamW)."""
    import torch

    from trainer.training.muon import NORMUON_BETA2, POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_SAFETY, BatchedMuon

    opt = torch.optim.Muon(params, **kw)
    out = [("torch.optim.Muon + copy/restore skip", lambda: torch_muon_step(opt, params, found_inf)),
           ("torch.optim.Muon, no skip", torch.optim.Muon(params, **kw).step)]
    by_shape = {}
    for q in params:
        by_shape.setdefault(tuple(q.shape), []).append(q)
    compiled = [False, True] if device.type == "cuda" else [False]
    extra = {"ns_coefficients": POLAR_EXPRESS_COEFFICIENTS, "ns_safety": POLAR_EXPRESS_SAFETY,
             "normuon_beta2": NORMUON_BETA2}
    for name, groups, options, compile in [
            ("BatchedMuon per shape", [{"params": g} for g in by_shape.values()], {}, False),
            ("BatchedMuon (ours)", params, {}, False),
            ("BatchedMuon per shape, compiled", [{"params": g} for g in by_shape.values()], {}, True),
            ("BatchedMuon, compiled (the job's)", params, {}, True),
            ("BatchedMuon, compiled, Polar Express + NorMuon", params, extra, True)]:
        if compile in compiled:
            ours = BatchedMuon(groups, **kw, **options, compile=compile)
            ours.found_inf = found_inf
            out.append((name, ours.step))
    adamw = torch.optim.AdamW(params, lr=8e-4, weight_decay=0.1, fused=device.type == "cuda")
    adamw.found_inf, adamw.grad_scale = (found_inf, None) if device.type == "cuda" else (None, None)
    out.append(("fused AdamW (found_inf)" if device.type == "cuda" else "AdamW (foreach)", adamw.step))
    return out


def profile(steps: list[tuple[str, object]], device, out: Path, n: int = 5) -> None:
    """Print (and write to out/muon-step-profile.txt) the top CUDA kernels of n steps of each setup."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    text = []
    for name, step in steps:
        for _ in range(3):
            step()  # compiled, allocated
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(n):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        text.append(f"== {name}: {n} steps\n" + prof.key_averages().table(sort_by=key, row_limit=15))
    out.mkdir(parents=True, exist_ok=True)
    (out / "muon-step-profile.txt").write_text("\n".join(text))
    print("\n".join(text))


def out_dir(args) -> Path:
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="124m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--profile", action="store_true", help="also print each setup's top CUDA kernels (torch.profiler)")
    args = p.parse_args()

    import torch

    device = torch.device(args.device)
    kw = {"lr": 1.6e-3, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "adjust_lr_fn": "match_rms_adamw"}
    found_inf = torch.zeros((), device=device)
    params = hidden_matrices(args.preset, args.vocab, args.seq_len, device)
    n_params = sum(q.numel() for q in params)
    shapes = sorted({tuple(q.shape) for q in params})

    rows = [(name, timed(step, args.steps, args.warmup, device))
            for name, step in setups(params, kw, found_inf, device)]
    if args.profile:
        profile(setups(params, kw, found_inf, device), device, out_dir(args))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{card}, torch {torch.__version__}, {args.preset}: {len(params)} hidden matrices, {n_params / 1e6:.1f}M "
          f"params, shapes {shapes}; median of {args.steps} steps after {args.warmup}")
    print(f"{'optimizer step':40} {'ms':>9}")
    for name, ms in rows:
        print(f"{name:40} {ms:>9.2f}")
    out = out_dir(args)
    path = out / f"muon-step-{args.preset}-{card.replace(' ', '_')}-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps({"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                "command": " ".join(sys.argv), "preset": args.preset, "matrices": len(params),
                                "shapes": shapes, "results": [{"setup": n, "ms": ms} for n, ms in rows]}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
