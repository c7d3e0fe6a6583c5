#!/usr/bin/env python3
"""One optimizer step over a preset's hidden matrices (the decoder's attention and MLP weights,
Muon's share): torch.optim.Muon (matrix by matrix, plus the copy-and-restore the loop's exact
non-finite skip needed for it), our BatchedMuon (one batched Newton-Schulz per shape, skip on the
device) and fused AdamW (found_inf), same matrices, fp32 weights and gradients.

    python scripts/bench_muon_step.py --preset 124m --steps 50
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="124m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    args = p.parse_args()

    import torch

    from trainer.training.muon import BatchedMuon

    device = torch.device(args.device)
    kw = {"lr": 1.6e-3, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "adjust_lr_fn": "match_rms_adamw"}
    found_inf = torch.zeros((), device=device)
    rows = []
    params = hidden_matrices(args.preset, args.vocab, args.seq_len, device)
    n_params = sum(q.numel() for q in params)
    shapes = sorted({tuple(q.shape) for q in params})

    opt = torch.optim.Muon(params, **kw)
    rows.append(("torch.optim.Muon + copy/restore skip", timed(lambda: torch_muon_step(opt, params, found_inf),
                                                               args.steps, args.warmup, device)))
    opt = torch.optim.Muon(params, **kw)
    rows.append(("torch.optim.Muon, no skip", timed(opt.step, args.steps, args.warmup, device)))
    ours = BatchedMuon(params, **kw)
    ours.found_inf = found_inf
    rows.append(("BatchedMuon (ours, exact skip)", timed(ours.step, args.steps, args.warmup, device)))
    adamw = torch.optim.AdamW(params, lr=8e-4, weight_decay=0.1, fused=device.type == "cuda")
    adamw.found_inf, adamw.grad_scale = (found_inf, None) if device.type == "cuda" else (None, None)
    rows.append(("fused AdamW (found_inf)" if device.type == "cuda" else "AdamW (foreach)",
                 timed(adamw.step, args.steps, args.warmup, device)))

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{card}, torch {torch.__version__}, {args.preset}: {len(params)} hidden matrices, {n_params / 1e6:.1f}M "
          f"params, shapes {shapes}; median of {args.steps} steps after {args.warmup}")
    print(f"{'optimizer step':40} {'ms':>9}")
    for name, ms in rows:
        print(f"{name:40} {ms:>9.2f}")
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"muon-step-{args.preset}-{card.replace(' ', '_')}-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps({"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                "command": " ".join(sys.argv), "preset": args.preset, "matrices": len(params),
                                "shapes": shapes, "results": [{"setup": n, "ms": ms} for n, ms in rows]}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
