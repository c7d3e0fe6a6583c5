#!/usr/bin/env python3
"""Issue 14 sweep: variants of the reference run (configs/reference-h200.yaml) for a fixed wall-clock
budget of training, each through the real `entrypoint.py run` of a frozen copy of the code.

The copy is `git archive 8ca9772` unpacked into .sweep/src (ignored by git), with
docs/reference-run/attempts/2026-11-30-sweep-hack.patch applied (train.optimizer=muon, train.muon_lr,
train.budget_seconds, model preset "mid"; SWEEP-2026-11-30.md beside it has the results); the
corpus is copied to .sweep/corpus and the wheels
the GPU image lacks (fire, termcolor, zstandard) to .sweep/whl. Every variant shares one bucket, so
the tokenizer and the shards are built once (reused by hash), and is scored the same way: the
held-out bits per character of its export in runs/<id>/report/eval.json (trainer.evaluation.evaluate).

    python scripts/sweep_reference.py prepare                       # tokenizer + shards, once
    python scripts/sweep_reference.py queue --gpu 0 --budget 60 adamw-wd0.8 muon-wd0.8 [--deadline EPOCH]
    python scripts/sweep_reference.py pick --family 124m --budget 60  # prints the best variant's name
    python scripts/sweep_reference.py table                          # markdown rows of every result

"recipe" is the common recipe of ../shared/GPU_NOTES.md (transformers.Trainer, lr 6e-4, wd 0.1) on
the same shards and tokenizer, its step count fixed from the anchor's measured 7.36 steps/s, scored
by the same evaluation. Results go to $SWEEP_ROOT/results/<variant>-<budget>s/ (config.yaml,
metrics.jsonl, eval.json, summary.json, run.log).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SRC = Path(os.environ.get("SWEEP_SRC", REPO / ".sweep" / "src")).resolve()
CORPUS = Path(os.environ.get("SWEEP_CORPUS", REPO / ".sweep" / "corpus")).resolve()
ROOT = Path(os.environ.get("SWEEP_ROOT", "/tmp/sweep"))
RESULTS = ROOT / "results"
OVERHEAD_S = 50  # start, compile, export and report of one variant on an H200 (for --deadline)
RECIPE_STEPS_PER_S = 2430 / 330  # the anchor: transformers.Trainer, 124M, batch 64 x 512, one H200

# Variant name -> config overrides on top of the reference config. Weight decay is AdamW's decoupled
# decay on matrices (and, for Muon, torch.optim.Muon's, the same p *= 1 - lr * wd form).
VARIANTS: dict[str, dict] = {
    "ref-adamw-wd0.1": {},
    "adamw-wd0.8": {"train.weight_decay": 0.8},
    "adamw-wd1.6": {"train.weight_decay": 1.6},
    "muon-wd0.8": {"train.optimizer": "muon", "train.weight_decay": 0.8},
    "muon-wd1.6": {"train.optimizer": "muon", "train.weight_decay": 1.6},
    "muon-wd0.8-mlr1.6e-3": {"train.optimizer": "muon", "train.weight_decay": 0.8, "train.muon_lr": 0.0016},
    "muon-wd0.1": {"train.optimizer": "muon", "train.weight_decay": 0.1},
    "mid-muon-wd0.8": {"model.preset": "mid", "train.optimizer": "muon", "train.weight_decay": 0.8},
    "mid-adamw-wd0.8": {"model.preset": "mid", "train.weight_decay": 0.8},
    "mid-muon-wd1.6": {"model.preset": "mid", "train.optimizer": "muon", "train.weight_decay": 1.6},
    "recipe": {},  # transformers.Trainer, see recipe()
}


def family(variant: str) -> str:
    return "recipe" if variant == "recipe" else "mid" if variant.startswith("mid-") else "124m"


def base_tree(gpu: int) -> dict:
    """The reference config with the sweep's shared settings: one bucket, the carried corpus, a step
    cap that train.budget_seconds lowers, one checkpoint at the end, no samples at checkpoints."""
    tree = yaml.safe_load((SRC / "configs" / "reference-h200.yaml").read_text(encoding="utf-8"))
    tree["storage"] = {"bucket": str(ROOT / "bucket"), "local_dir": str(ROOT / f"work-gpu{gpu}")}
    tree["data"] = {"sources": [str(CORPUS / "*.jsonl.zst")]}
    tree["train"].update({"max_steps": 100_000, "checkpoint_every_steps": 100_000, "eval_every_steps": 250})
    tree.setdefault("sample", {}).update({"at_checkpoints": False})
    for key, value in json.loads(os.environ.get("SWEEP_BASE", "{}")).items():  # CPU smoke tests
        section, _, name = key.partition(".")
        tree.setdefault(section, {})[name] = value
    return tree


def variant_tree(variant: str, budget: float, gpu: int) -> dict:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    tree = base_tree(gpu)
    tree["run"]["id"] = f"{variant}-{budget:g}s"
    tree["train"]["budget_seconds"] = float(budget)
    tree["train"]["eval_every_steps"] = 100 if budget <= 120 else 250
    tree["sample"]["heldout_prompts"] = 8 if budget <= 120 else 32
    for key, value in VARIANTS[variant].items():
        section, _, name = key.partition(".")
        tree[section][name] = value
    return tree


def entrypoint(args: list[str], log_path: Path, env: dict | None = None) -> int:
    with open(log_path, "a", encoding="utf-8") as log:
        return subprocess.call([sys.executable, "entrypoint.py", *args], cwd=SRC, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def prepare(_args) -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    tree = base_tree(0)
    tree["run"]["id"] = "sweep-prepare"
    path = ROOT / "prepare.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    t0 = time.time()
    code = entrypoint(["prepare", f"--config={path}"], ROOT / "prepare.log")
    print(f"prepare: exit {code} after {time.time() - t0:.1f}s", flush=True)
    return code


def train_tokens() -> int:
    """Training tokens of the shards (19,629,540 for the 15 poetry shards at 32k vocabulary)."""
    index = next((ROOT / "bucket" / "data").glob("*/index.json"), None)
    if index is None:
        return int(os.environ.get("SWEEP_TRAIN_TOKENS", 19_629_540))
    return json.loads(index.read_text())["tokens"]["train"]


def summarize(out: Path, variant: str, budget: float, wall_s: float, code: int) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "metrics.jsonl").is_file() else []
    ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    cfg = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else {}
    t = cfg.get("train", {})
    last = rows[-1] if rows else {}
    vals = [r["val_bpc"] for r in rows if r.get("val_bpc") is not None]
    speeds = [r["tok_per_s"] for r in rows if r.get("tok_per_s")]
    speeds = speeds[2:] or speeds  # the first log steps hold torch.compile
    human = ev.get("vs_human", {})
    summary = {
        "variant": variant, "budget_s": budget, "exit": code, "wall_s": round(wall_s, 1),
        "model": cfg.get("model", {}).get("preset"), "optimizer": t.get("optimizer", "adamw"),
        "lr": t.get("lr"), "muon_lr": t.get("muon_lr") or (t.get("lr") if t.get("optimizer") == "muon" else None),
        "weight_decay": t.get("weight_decay"), "betas": [t.get("beta1"), t.get("beta2")],
        "batch_tokens": t.get("batch_tokens"), "seq_len": t.get("seq_len"),
        "steps": last.get("step"), "tokens": last.get("tokens"), "train_s": last.get("elapsed_s"),
        "epochs": round(last["tokens"] / train_tokens(), 2) if last.get("tokens") else None,
        "tok_per_s": round(statistics.median(speeds)) if speeds else None, "mfu": last.get("mfu"),
        "peak_mem_gb": last.get("peak_mem_gb"), "final_loss": last.get("loss"),
        "val_bpc_final": vals[-1] if vals else None, "val_bpc_best": min(vals) if vals else None,
        "heldout_bpc": ev.get("heldout", {}).get("bits_per_char"),
        "distinct_2_model": human.get("model", {}).get("distinct_2"),
        "distinct_2_human": human.get("human", {}).get("distinct_2"),
        "repeated_4gram_model": human.get("model", {}).get("repeated_4gram_fraction"),
    }
    if variant == "recipe":  # transformers.Trainer's settings (recipe()), not the config's
        summary.update({"model": "124m", "optimizer": "adamw (Trainer)", "lr": 6e-4, "muon_lr": None,
                        "weight_decay": 0.1, "betas": [0.9, 0.999]})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_variant(variant: str, budget: float, gpu: int) -> dict:
    tree = variant_tree(variant, budget, gpu)
    run_id = tree["run"]["id"]
    out = RESULTS / run_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False), encoding="utf-8")
    env = {"CUDA_VISIBLE_DEVICES": str(gpu), "OMP_NUM_THREADS": "8", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    if variant == "recipe":
        code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "recipe", "--budget", str(budget),
                                "--gpu", str(gpu)], stdout=open(out / "run.log", "a"), stderr=subprocess.STDOUT,
                               env={**os.environ, **env})
    else:
        code = entrypoint(["run", f"--config={out / 'config.yaml'}"], out / "run.log", env)
        run_dir = ROOT / "bucket" / "runs" / run_id
        for src, dst in ((run_dir / "metrics.jsonl", "metrics.jsonl"), (run_dir / "report" / "eval.json", "eval.json"),
                         (run_dir / "config.yaml", "config.yaml")):
            if src.is_file():
                (out / dst).write_bytes(src.read_bytes())
    s = summarize(out, variant, budget, time.time() - t0, code)
    if code != 0:
        print(f"{variant}: exit {code}; the end of {out / 'run.log'}:", flush=True)
        print("\n".join((out / "run.log").read_text(errors="replace").splitlines()[-40:]), flush=True)
    print(json.dumps(s), flush=True)
    return s


def queue(args) -> int:
    deadline = args.deadline or float("inf")
    for variant in args.variants:
        need = args.budget + OVERHEAD_S
        if time.time() + need > deadline:
            print(f"skip {variant}: {need:.0f}s would pass the deadline", flush=True)
            continue
        run_variant(variant, args.budget, args.gpu)
    return 0


def recipe(args) -> int:
    """The common recipe (../shared/GPU_NOTES.md "Model-quality anchor"): transformers.Trainer on the
    124m LlamaForCausalLM, seq 512, batch 64, lr 6e-4 cosine, warmup 100, wd 0.1, bf16, SDPA, fused
    AdamW; trained on the sweep's shards, exported with its tokenizer, scored like every variant."""
    sys.path.insert(0, str(SRC))
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainer.config import load_config_tree
    from trainer.data.loader import TokenSamples
    from trainer.data.tokenizer import load_tokenizer
    from trainer.evaluation.evaluate import evaluate_model, heldout_documents
    from trainer.evaluation.generate import load_for_generation
    from trainer.launch import bucket, fetch_folder, stage_prepare, stage_pull
    from trainer.model.llama import build_model, llama_config

    tree = variant_tree("recipe", args.budget, args.gpu)
    cfg = load_config_tree(tree)
    out = RESULTS / cfg.run.id
    files = stage_pull(cfg)
    arts = stage_prepare(cfg, files)
    local = Path(cfg.storage.local_dir)
    data_dir = fetch_folder(bucket(cfg), arts.data_key, local)
    tok = load_tokenizer(fetch_folder(bucket(cfg), arts.tokenizer_key, local))
    index = json.loads((data_dir / "index.json").read_text())
    preset, seq = cfg.model.preset, cfg.train.seq_len  # 124m, 512 (the reference config)
    batch = cfg.train.batch_tokens // seq  # 64
    samples = TokenSamples(data_dir, index, "train", seq)

    class Packed(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            ids = torch.from_numpy(samples.get([i])[0, :-1])
            return {"input_ids": ids, "labels": ids}

    rows: list[dict] = []
    t0 = [0.0]

    class Log(TrainerCallback):
        def on_train_begin(self, *a, **k):
            t0[0] = time.time()

        def on_log(self, targs, state, control, logs=None, **k):
            if logs and "loss" in logs:
                rows.append({"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                             "tokens": state.global_step * batch * seq, "elapsed_s": round(time.time() - t0[0], 2),
                             "tok_per_s": None})

    steps = round(args.budget * RECIPE_STEPS_PER_S)
    torch.manual_seed(cfg.train.seed)
    model = build_model(llama_config(preset, index["vocab_size"], seq, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id), "sdpa")
    targs = TrainingArguments(
        output_dir=str(local / "recipe-trainer"), per_device_train_batch_size=batch, max_steps=steps,
        bf16=torch.cuda.is_available(),
        optim="adamw_torch_fused", learning_rate=6e-4, weight_decay=0.1, warmup_steps=100,
        lr_scheduler_type="cosine", logging_steps=50, save_strategy="no", report_to=[], seed=cfg.train.seed,
        dataloader_num_workers=2, dataloader_pin_memory=True, disable_tqdm=True, max_grad_norm=1.0)
    result = Trainer(model=model, args=targs, train_dataset=Packed(), callbacks=[Log()]).train()
    train_s = result.metrics["train_runtime"]
    rows.append({"step": steps, "loss": rows[-1]["loss"] if rows else None, "tokens": steps * batch * seq,
                 "elapsed_s": round(train_s, 2), "tok_per_s": round(steps * batch * seq / train_s, 1),
                 "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available()
                 else None})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    export = local / "recipe-export"
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(str(export))
    tok.save_pretrained(str(export))
    del model
    torch.cuda.empty_cache()
    model, tok = load_for_generation(str(export), cfg)
    docs = heldout_documents(cfg, files, cfg.sample.eval_chars, cfg.sample.heldout_prompts)
    ev = {"export_step": steps, **evaluate_model(model, tok, cfg, docs)}
    (out / "eval.json").write_text(json.dumps(ev, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"recipe: {steps} steps in {train_s:.1f}s, held-out {ev['heldout']['bits_per_char']:.4f} bits/char",
          flush=True)
    return 0


def pick(args) -> int:
    found = []
    for path in RESULTS.glob(f"*-{args.budget:g}s/summary.json"):
        s = json.loads(path.read_text())
        if family(s["variant"]) == args.family and s.get("heldout_bpc") is not None:
            found.append((s["heldout_bpc"], s["variant"]))
    if not found:
        return 1
    print(min(found)[1])
    return 0


def resummarize(_args) -> int:
    for out in sorted(p for p in RESULTS.iterdir() if (p / "config.yaml").is_file()):
        old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        variant, _, budget = out.name.rpartition("-")
        summarize(out, variant, float(budget.rstrip("s")), old.get("wall_s", 0.0), old.get("exit", 0))
    return 0


def table(_args) -> int:
    print("| variant | budget s | model | optimizer | lr (AdamW / Muon) | wd | steps | train s | tok/s | epochs "
          "| val bpc final (best) | **held-out bpc** | distinct-2 model / human |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(RESULTS.glob("*/summary.json")):
        s = json.loads(path.read_text())
        recipe_row = s["variant"] == "recipe"
        lrs = ("6e-4 (Trainer)" if recipe_row else f"{s['lr']:g} / {s['muon_lr']:g}" if s.get("muon_lr")
               else f"{s['lr']:g}")

        def f(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)
        print(f"| {s['variant']} | {s['budget_s']:g} | {s['model']} | {s['optimizer']} | {lrs} | {s['weight_decay']} | "
              f"{s['steps']} | {f(s['train_s'], '{:.0f}')} | {f(s['tok_per_s'], '{:,.0f}')} | "
              f"{f(s['epochs'], '{:.2f}')} | "
              f"{f(s['val_bpc_final'])} ({f(s['val_bpc_best'])}) | **{f(s['heldout_bpc'])}** | "
              f"{f(s['distinct_2_model'])} / {f(s['distinct_2_human'])} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    q = sub.add_parser("queue")
    q.add_argument("variants", nargs="+")
    q.add_argument("--gpu", type=int, default=0)
    q.add_argument("--budget", type=float, required=True, help="seconds of training per variant")
    q.add_argument("--deadline", type=float, default=0, help="epoch seconds: skip variants that would end later")
    r = sub.add_parser("recipe")
    r.add_argument("--budget", type=float, required=True)
    r.add_argument("--gpu", type=int, default=0)
    k = sub.add_parser("pick")
    k.add_argument("--family", choices=("124m", "mid", "recipe"), required=True)
    k.add_argument("--budget", type=float, required=True)
    sub.add_parser("table")
    sub.add_parser("resummarize", help="rewrite every result's summary.json from its files (after a crash)")
    args = p.parse_args()
    return {"prepare": prepare, "queue": queue, "recipe": recipe, "pick": pick, "table": table,
            "resummarize": resummarize}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
