#!/usr/bin/env python3
"""Prepare throughput and scaling: corpus copies x nodes x worker processes x encoder threads.

    python scripts/bench_prepare.py                                   # data/sample, copies 1 and 4
    python scripts/bench_prepare.py --files '/data/poetry/*.zst' --copies 1,4,16 --workers 1,2,4,8,16 \
        --threads_per_worker 1,2,4 --nodes 1,2 --out bench/results/prepare-host.json

The given files are hard-linked `copies` times (the corpus grows, its files stay those files;
data.dedup is off unless --dedup, since copies are duplicates). A tokenizer of --vocab tokens is
trained once on the first copy. Then, each in fresh interpreters (so peak RSS is its own):
  pool    the prepare stage's own call (trainer.data.prepare_pool.prepare_into_bucket) with
          data.prepare_workers=W and data.prepare_threads=T on each of N nodes: N processes with
          NODE_RANK=0..N-1, NNODES=N on this machine, sharing one bucket (a local folder, or with --s3
          a moto S3 server on loopback that also holds the corpus, read by range: the streamed
          path). Node 0's wall time (plan, units, wait, assembly, uploads) is the row's time;
  one     trainer.data.shards.prepare_shards over iter_documents (the one-process path of before:
          a reader thread plus the Rust encoder's threads), for comparison.
Characters/s counts the characters written to the shards (after filters) over the wall time;
/core is that over N x W x T (the cores the row asks for); scaling efficiency is the row's rate
over (N x W x T) x the 1-node, 1-worker, 1-thread rate of the same copies. Peak RSS (VmHWM): node
0's parent process and the largest worker. Peak local disk: the most the nodes' storage.local_dir
folders held at once (sampled every 20 ms; allocated blocks), also as a share of corpus + shards.
A machine shared with other work is noisy: the load average before each run is recorded. Prints a
table; writes JSON to --out (default bench/results/prepare-<host>-<date>.json) after every row.
"""

from __future__ import annotations

import argparse
import contextlib
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
    """One measured prepare on one node (in its own interpreter; NODE_RANK and NNODES as launchers set them)."""
    import threading

    from tokenizers import Tokenizer

    from trainer.config import load_config
    from trainer.data import prepare_pool, units
    from trainer.data.readers import iter_documents
    from trainer.data.remote import disk_bytes
    from trainer.data.shards import prepare_shards
    from trainer.data.sources import pull, resolve_sources
    from trainer.io.storage import open_storage
    from trainer.log import setup_logging

    setup_logging()
    units.UNIT_BYTES = params["unit_bytes"]
    node, nodes = int(os.environ.get("NODE_RANK", "0")), int(os.environ.get("NNODES", "1"))
    local = Path(params["work"]) / f"node{node}"
    cfg = load_config(None, {"data.dedup": params["dedup"], "data.sources": params["sources"],
                             "data.prepare_workers": params["workers"], "data.prepare_threads": params["threads"],
                             "storage.bucket": params["bucket"], "storage.endpoint_url": params["endpoint"],
                             "storage.local_dir": str(local)}, env={})
    tok = Tokenizer.from_file(params["tokenizer"])
    files = pull(cfg, resolve_sources(cfg), progress=False, stream=True)  # s3://: left in the bucket
    marks, run_pool = [], prepare_pool._run_pool

    def spy(*a, **k):  # the workers' counts (their peak RSS), which the bucket's markers lose at the end
        for n, s in run_pool(*a, **k):
            marks.append(s)
            yield n, s
    prepare_pool._run_pool = spy
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], disk_bytes(local))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.time()
    if params["workers"]:
        store = open_storage(cfg.storage.bucket, cfg.storage)
        index = prepare_pool.prepare_into_bucket(cfg, files, tok, store, "data/bench", {}, node, nodes)
    else:
        index = prepare_shards(cfg, iter_documents(cfg.data, pull(cfg, files, progress=False)), tok, local / "out",
                               progress=False)
    seconds = time.time() - start
    stop.set()
    sampler.join()
    out = {"seconds": round(seconds, 2), "node": node, "peak_local_disk_bytes": peak[0],
           "peak_rss_parent_bytes": units.peak_rss_bytes(),
           "peak_rss_worker_bytes": max((m["worker_peak_rss_bytes"] for m in marks), default=0),
           "units_encoded": len(marks)}
    if index is not None:
        out.update(chars=sum(index["chars"].values()), tokens=sum(index["tokens"].values()),
                   units=index.get("units"), input_bytes=sum(f.size for f in files),
                   shard_bytes=sum(e["tokens"] for e in index["train"] + index["val"]) * (2 if index["dtype"] ==
                                                                                          "uint16" else 4))
    return out


def run_nodes(params: dict, nodes: int) -> dict:
    """One row: `nodes` children started together (node 0 last), node 0's result with the peaks of all."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        procs, paths = [], []
        for node in reversed(range(nodes)):
            path = Path(tmp) / f"node{node}.json"
            env = {**os.environ, "NODE_RANK": str(node), "NNODES": str(nodes)}
            procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(params), "--result",
                                           str(path)], cwd=ROOT, env=env))
            paths.append(path)
        for proc in procs:
            if proc.wait():
                for p in procs:
                    p.kill()
                raise RuntimeError(f"benchmark child exited with {proc.returncode}: {params}")
        results = [json.loads(p.read_text()) for p in paths]
    out = next(r for r in results if r["node"] == 0)
    out.update(loadavg_before=round(load, 2), chars_per_second=round(out["chars"] / out["seconds"]), nodes=nodes,
               peak_local_disk_bytes=max(r["peak_local_disk_bytes"] for r in results),  # each node has its own disk
               peak_rss_worker_bytes=max(r["peak_rss_worker_bytes"] for r in results),
               units_per_node=[r["units_encoded"] for r in sorted(results, key=lambda r: r["node"])])
    out["peak_local_disk_share"] = round(out["peak_local_disk_bytes"] / max(1, out["input_bytes"] +
                                                                            out["shard_bytes"]), 4)
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
    head = (f"{'copies':>6} {'mode':>5} {'nodes':>5} {'workers':>7} {'threads':>7} {'units':>5} {'Mchars':>8} "
            f"{'s':>7} {'Mchar/s':>8} {'/core':>6} {'scaling':>7} {'RSS parent MB':>13} {'RSS worker MB':>13} "
            f"{'disk MB':>8} {'disk %':>6} {'load':>5}")
    lines = [head]
    for r in rows:
        eff = f"{r['scaling_efficiency']:.0%}" if r.get("scaling_efficiency") is not None else "-"
        per = f"{r['chars_per_second_per_core'] / 1e6:.2f}" if r["workers"] else "-"
        lines.append(f"{r['copies']:>6} {r['mode']:>5} {r['nodes']:>5} {r['workers'] or '-':>7} {r['threads']:>7} "
                     f"{r['units'] or '-':>5} {r['chars'] / 1e6:>8.1f} {r['seconds']:>7.2f} "
                     f"{r['chars_per_second'] / 1e6:>8.2f} {per:>6} {eff:>7} {r['peak_rss_parent_bytes'] / 1e6:>13.0f} "
                     f"{(r['peak_rss_worker_bytes'] / 1e6 if r['workers'] else 0):>13.0f} "
                     f"{r['peak_local_disk_bytes'] / 1e6:>8.1f} {r['peak_local_disk_share']:>6.1%} "
                     f"{r['loadavg_before']:>5}")
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", default=str(ROOT / "data" / "sample" / "*.zst"), help="glob of corpus files")
    p.add_argument("--copies", default="1,4")
    p.add_argument("--workers", default=",".join(str(n) for n in sorted({*(2 ** i for i in range(8) if 2 ** i < cores),
                                                                         cores})),
                   help="worker processes per node (data.prepare_workers)")
    p.add_argument("--threads_per_worker", default="1", help="Rust encoder threads per worker (data.prepare_threads)")
    p.add_argument("--nodes", default="1", help="nodes on loopback: processes with NODE_RANK=0..N-1, one bucket")
    p.add_argument("--max_cores", type=int, default=0,
                   help="skip rows asking for more than this many cores (nodes x workers x threads); 0 = all cores")
    p.add_argument("--s3", action="store_true", help="corpus and bucket on a moto S3 server on loopback (streamed)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sample-bytes", type=int, default=10_000_000, help="tokenizer training text")
    p.add_argument("--unit-mb", type=float, default=64, help="trainer.data.units.UNIT_BYTES, in MB")
    p.add_argument("--dedup", action="store_true")
    p.add_argument("--no-one-process", action="store_true", help="skip the one-process comparison")
    p.add_argument("--out", default="", help="JSON path (default bench/results/prepare-<host>-<date>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(child(json.loads(args.child))))
        return
    files = sorted(glob.glob(args.files))
    assert files, f"no file matches {args.files}"
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp, bucket_for(args, Path(tmp)) as (bucket, endpoint):
        tmp = Path(tmp)
        tok = tmp / "tokenizer.json"
        train_tok(files, args.vocab, args.sample_bytes, tok)
        rows = []
        for copies in ints(args.copies):
            corpus = make_copies(files, copies, tmp)
            sources = upload(corpus, tmp, bucket, endpoint, copies) if endpoint else corpus
            base = None
            setups = [(1, 0, 1)] if not args.no_one_process else []
            limit = args.max_cores or cores
            setups += [(n, w, t) for n in ints(args.nodes) for w in ints(args.workers)
                       for t in ints(args.threads_per_worker) if n * w * t <= limit or n * w * t == 1]
            for n, w, t in setups:
                work = tmp / f"run-{copies}-{n}-{w}-{t}"
                params = {"sources": sources, "tokenizer": str(tok), "workers": w, "threads": t, "dedup": args.dedup,
                          "unit_bytes": int(args.unit_mb * (1 << 20)), "work": str(work),
                          "bucket": f"{bucket}/run-{copies}-{n}-{w}-{t}", "endpoint": endpoint}
                r = run_nodes(params, n)
                shutil.rmtree(work, ignore_errors=True)
                r.update(copies=copies, workers=w, threads=t, mode="pool" if w else "one")
                if w:
                    r["chars_per_second_per_core"] = round(r["chars_per_second"] / (n * w * t))
                    base = base or (r["chars_per_second"] if (n, w, t) == (1, 1, 1) else None)
                    r["scaling_efficiency"] = round(r["chars_per_second"] / (n * w * t * base), 3) if base else None
                rows.append(r)
                print(table([r]).splitlines()[1], flush=True)
                write_json(args, files, cores, rows)  # after every row: a cut-short run keeps what it measured
    print("\n" + table(rows))
    print(f"-> {write_json(args, files, cores, rows)}")


@contextlib.contextmanager
def bucket_for(args, tmp: Path):
    """(bucket URL, endpoint): a local folder, or (--s3) a moto server on loopback (tests/faults.py)."""
    if not args.s3:
        yield str(tmp / "bucket"), ""
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from faults import moto_s3

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    with moto_s3("bench") as endpoint:
        yield "s3://bench", endpoint


def upload(corpus: list[str], tmp: Path, bucket: str, endpoint: str, copies: int) -> list[str]:
    """The corpus copies uploaded under <bucket>/corpus-<copies>/; the source is that folder."""
    from trainer.config import StorageConfig
    from trainer.io.storage import open_storage

    store = open_storage(bucket, StorageConfig(endpoint_url=endpoint))
    prefix = f"corpus-{copies}"
    for path in corpus:
        store.upload_file(path, f"{prefix}/{Path(path).relative_to(tmp).as_posix()}")
    return [f"{bucket}/{prefix}/"]


def write_json(args, files: list[str], cores: int, rows: list[dict]) -> Path:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    res = {"host": platform.node(), "cores": cores, "cpu": cpu, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "files": [os.path.relpath(f, ROOT) if f.startswith(str(ROOT)) else f
                                                     for f in files], "vocab": args.vocab, "dedup": args.dedup,
           "unit_bytes": int(args.unit_mb * (1 << 20)), "s3": args.s3, "rows": rows}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"prepare-{res['host']}-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
