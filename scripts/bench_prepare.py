#!/usr/bin/env python3
"""Prepare throughput and scaling: corpus copies x worker processes, on this machine.

    python scripts/bench_prepare.py                                   # data/sample, copies 1 and 4
    python scripts/bench_prepare.py --files '/data/poetry/*.zst' --copies 1,4,16 --workers 1,2,4,8,16

The given files are hard-linked `copies` times (the corpus grows, its files stay those files;
data.dedup is off unless --dedup, since copies are duplicates). A tokenizer of --vocab tokens is
trained once on the first copy. Then, each in a fresh interpreter (so peak RSS is its own):
  pool N   trainer.data.prepare_pool.prepare_corpus with N worker processes (what the prepare stage
           runs): plan the units, tokenize them, assemble the shards;
  one      trainer.data.shards.prepare_shards over iter_documents (the one-process path of before:
           a reader thread plus the Rust encoder's threads), for comparison.
Characters/s counts the characters written to the shards (after filters) over the call's wall time;
per-worker is that over N; scaling efficiency is rate(N) / (N x rate(1)) for the same copies.
Peak RSS (VmHWM): the parent process, and the largest worker (from the units' done markers). A machine shared with other
work is noisy: the load average before each run is recorded. Prints a table; writes JSON to
bench/results/prepare-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(params: dict) -> dict:
    """One measured prepare (in its own interpreter)."""
    from tokenizers import Tokenizer

    from trainer.config import load_config
    from trainer.data import units
    from trainer.data.prepare_pool import prepare_corpus
    from trainer.data.readers import iter_documents
    from trainer.data.shards import prepare_shards
    from trainer.data.sources import local_files

    units.UNIT_BYTES = params["unit_bytes"]
    cfg = load_config(None, {"data.dedup": params["dedup"]}, env={})
    tok = Tokenizer.from_file(params["tokenizer"])
    files = local_files(params["files"])
    out, scratch = Path(params["work"]) / "out", Path(params["work"]) / "scratch"
    start = time.time()
    if params["workers"]:
        index = prepare_corpus(cfg, files, tok, out, scratch, workers=params["workers"])
    else:
        index = prepare_shards(cfg, iter_documents(cfg.data, files), tok, out, progress=False)
    seconds = time.time() - start
    marks = [json.loads(p.read_text()) for p in scratch.glob("*.done.json")]
    return {"seconds": round(seconds, 2), "chars": sum(index["chars"].values()),
            "tokens": sum(index["tokens"].values()), "units": index.get("units"),
            "input_bytes": sum(f.size for f in files), "peak_rss_parent_bytes": units.peak_rss_bytes(),
            "peak_rss_worker_bytes": max((m["worker_peak_rss_bytes"] for m in marks), default=0)}


def run_child(params: dict) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(params), "--result", result.name],
                              cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"benchmark child exited with {proc.returncode}: {params}")
        out = json.loads(Path(result.name).read_text())
    out.update(loadavg_before=round(load, 2), chars_per_second=round(out["chars"] / out["seconds"]))
    return out


def make_copies(files: list[str], copies: int, root: Path) -> list[str]:
    out = []
    for k in range(copies):
        folder = root / f"copies-{copies}" / f"copy-{k:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            dest = folder / Path(f).name
            if not dest.exists():
                try:
                    os.link(f, dest)
                except OSError:  # another file system
                    shutil.copyfile(f, dest)
            out.append(str(dest))
    return out


def train_tok(files: list[str], vocab: int, sample_bytes: int, path: Path) -> None:
    from trainer.config import DataConfig
    from trainer.data.readers import iter_documents
    from trainer.data.sources import local_files
    from trainer.data.tokenizer import train_tokenizer

    texts, n = [], 0
    for t in iter_documents(DataConfig(), local_files(files)):
        texts.append(t)
        n += len(t.encode())
        if n > sample_bytes:
            break
    train_tokenizer(texts, vocab, 4, 2, pre_tokenizer="qwen2").save(str(path))


def table(rows: list[dict]) -> str:
    head = (f"{'copies':>6} {'mode':>5} {'workers':>7} {'units':>5} {'Mchars':>8} {'s':>7} {'Mchar/s':>8} "
            f"{'/worker':>8} {'scaling':>7} {'RSS parent MB':>13} {'RSS worker MB':>13} {'load':>5}")
    lines = [head]
    for r in rows:
        eff = f"{r['scaling_efficiency']:.0%}" if r.get("scaling_efficiency") is not None else "-"
        per = f"{r['chars_per_second_per_worker'] / 1e6:.2f}" if r["workers"] else "-"
        lines.append(f"{r['copies']:>6} {r['mode']:>5} {r['workers'] or '-':>7} {r['units'] or '-':>5} "
                     f"{r['chars'] / 1e6:>8.1f} {r['seconds']:>7.2f} {r['chars_per_second'] / 1e6:>8.2f} {per:>8} "
                     f"{eff:>7} {r['peak_rss_parent_bytes'] / 1e6:>13.0f} "
                     f"{(r['peak_rss_worker_bytes'] / 1e6 if r['workers'] else 0):>13.0f} {r['loadavg_before']:>5}")
    return "\n".join(lines)


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", default=str(ROOT / "data" / "sample" / "*.zst"), help="glob of corpus files")
    p.add_argument("--copies", default="1,4")
    p.add_argument("--workers", default=",".join(str(n) for n in sorted({*(2 ** i for i in range(8) if 2 ** i < cores),
                                                                         cores})))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sample-bytes", type=int, default=10_000_000, help="tokenizer training text")
    p.add_argument("--unit-mb", type=float, default=64, help="trainer.data.units.UNIT_BYTES, in MB")
    p.add_argument("--dedup", action="store_true")
    p.add_argument("--no-one-process", action="store_true", help="skip the one-process comparison")
    p.add_argument("--out", default="")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(child(json.loads(args.child))))
        return
    files = sorted(glob.glob(args.files))
    assert files, f"no file matches {args.files}"
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        tok = tmp / "tokenizer.json"
        train_tok(files, args.vocab, args.sample_bytes, tok)
        for copies in [int(c) for c in args.copies.split(",")]:
            corpus = make_copies(files, copies, tmp)
            base = None
            for w in ([0] if not args.no_one_process else []) + workers:
                work = tmp / f"run-{copies}-{w}"
                params = {"files": corpus, "tokenizer": str(tok), "workers": w, "dedup": args.dedup,
                          "unit_bytes": int(args.unit_mb * (1 << 20)), "work": str(work)}
                r = run_child(params)
                shutil.rmtree(work, ignore_errors=True)
                r.update(copies=copies, workers=w, mode="pool" if w else "one")
                if w:
                    r["chars_per_second_per_worker"] = round(r["chars_per_second"] / w)
                    base = base or (r["chars_per_second"] if w == 1 else None)
                    r["scaling_efficiency"] = round(r["chars_per_second"] / (w * base), 3) if base else None
                rows.append(r)
                print(table([r]).splitlines()[1], flush=True)
                write_json(args, files, cores, rows)  # after every row: a cut-short run keeps what it measured
    print("\n" + table(rows))
    print(f"-> {write_json(args, files, cores, rows)}")


def write_json(args, files: list[str], cores: int, rows: list[dict]) -> Path:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    res = {"host": platform.node(), "cores": cores, "cpu": cpu, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "files": [os.path.relpath(f, ROOT) if f.startswith(str(ROOT)) else f
                                                     for f in files], "vocab": args.vocab, "dedup": args.dedup,
           "unit_bytes": int(args.unit_mb * (1 << 20)), "rows": rows}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"prepare-{res['host']}-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
