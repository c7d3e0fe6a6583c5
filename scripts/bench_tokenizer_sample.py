#!/usr/bin/env python3
"""Tokenizer stage time and compression as the corpus grows: the whole read vs the spread read.

    python scripts/bench_tokenizer_sample.py                                   # data/sample and poetry, 1x 16x 64x
    python scripts/bench_tokenizer_sample.py --corpora sample --copies 1,16     # a quick look

A corpus of k copies is k folders of hard links (copies when linking fails) to the files of
data/sample (2 shards, 2.4 MB zst) or ../shared/corpus/poetry (15 shards, 34 MB zst). Each point
runs `trainer.job.stages.stage_tokenizer` in a fresh interpreter (its own peak RSS) on a local
bucket, timed from the listing it is given (as `run` passes it after `pull`) to the published
tokenizer:
  new  the stage as it is: trainer/data/sample.py's bounded, evenly spread read;
  old  the same stage reading every document (iter_documents), as before the spread read.
chars/token is measured twice: on the held-out documents the stage itself read (its report), and
on one fixed held-out set per corpus, the first 2 MB of validation documents of the whole 1x corpus
(the old stage's own set), so that old and new, and every size, are compared on the same text.
Copies repeat every document k times, so past 1x the corpus holds no new text: the point is what
the stage costs, and that the spread read does not compress worse. The sample of a corpus of
copies holds each document many times, which makes BPE training itself cheaper there ("train s"):
"read s" and "text MB" are the part that grows with the corpus. Prints a table; writes it (.txt)
and the JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
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

CORPORA = {"sample": ROOT / "data" / "sample", "poetry": ROOT.parent / "shared" / "corpus" / "poetry"}


# Worker (a subprocess per point) -----------------------------------------------------------------

def worker(params: dict) -> dict:
    from trainer.config import load_config
    from trainer.data.readers import iter_documents
    from trainer.data.sources import resolve_sources
    from trainer.data.tokenizer import chars_per_token, load_tokenizer
    from trainer.io.artifacts import bucket
    from trainer.job import stages

    work = Path(params["work"])
    cfg = load_config(None, {"data.sources": [params["corpus"]], "storage.bucket": str(work / "bucket"),
                             "storage.local_dir": str(work / "local"), **params["overrides"]}, env={})
    files = resolve_sources(cfg)
    if params["method"] == "old":  # the stage before the spread read: every document, the old key
        stages.read_sample = lambda data_cfg, fs, sample_bytes, reader: iter_documents(data_cfg, fs, reader)
        stages.sample_key = lambda fs, sample_bytes: ""
        stages.describe_read = lambda fs, sample_bytes: {"mode": "whole corpus", "files": len(fs),
                                                         "files_read": len(fs)}
    start = time.time()
    key = stages.stage_tokenizer(cfg, files)
    seconds = time.time() - start
    report = json.loads(bucket(cfg).read_text(f"{key}/report.json"))
    tok = load_tokenizer(work / "local" / key)
    heldout = json.loads(Path(params["heldout"]).read_text(encoding="utf-8"))
    return {"seconds": round(seconds, 2), "seconds_sampling": report["seconds_sampling"],
            "seconds_training": report["seconds_training"], "read_text_bytes": report["corpus_train_bytes"],
            "sample_bytes": report["sample_bytes"], "sample_documents": report["sample_documents"],
            "sample_read": report["sample_read"], "chars_per_token_stage_heldout": report["chars_per_token_heldout"],
            "stage_heldout_documents": report["heldout_documents"],
            "chars_per_token": round(chars_per_token(tok, heldout), 4), "heldout_documents": len(heldout),
            "files": len(files), "stored_bytes": sum(f.size for f in files), "key": key}


# The parent --------------------------------------------------------------------------------------

def make_copies(src: Path, k: int, dest: Path) -> Path:
    """dest/copy-000 .. copy-(k-1), each holding src's corpus files as hard links (or copies)."""
    files = sorted(p for p in src.iterdir() if p.is_file() and ".jsonl" in p.name)
    for i in range(k):
        folder = dest / f"copy-{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for p in files:
            try:
                os.link(p, folder / p.name)
            except OSError:
                shutil.copy2(p, folder / p.name)
    return dest


def fixed_heldout(corpus: Path, overrides: dict, out: Path) -> int:
    """The old stage's held-out set on the 1x corpus (normalised, first HELDOUT_BYTES), as JSON."""
    import dataclasses

    from trainer.config import load_config
    from trainer.data.readers import iter_documents
    from trainer.data.shards import Normalizer, is_validation
    from trainer.data.sources import resolve_sources
    from trainer.data.tokenizer import HELDOUT_BYTES

    cfg = load_config(None, {"data.sources": [str(corpus)], **overrides}, env={})
    norm = Normalizer(dataclasses.replace(cfg.data, dedup=False))
    texts, size = [], 0
    for text in norm(iter_documents(cfg.data, resolve_sources(cfg))):
        if is_validation(text, cfg.data.val_permille) and size < HELDOUT_BYTES:
            texts.append(text)
            size += len(text.encode())
    out.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    return len(texts)


def run_child(params: dict, label: str) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        load_before = os.getloadavg()[0]
        proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(params), "--result", result.name],
                                cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{label}: worker exited with {os.waitstatus_to_exitcode(status)}")
        out = json.loads(Path(result.name).read_text())
    out.update(peak_rss_bytes=usage.ru_maxrss * 1024, loadavg_before=round(load_before, 2),
               loadavg_after=round(os.getloadavg()[0], 2))
    print(f"  {label}: {out['seconds']} s ({out['seconds_sampling']} s reading), {out['chars_per_token']} chars/token, "
          f"read {out['read_text_bytes'] / 1e6:.1f} MB of text", flush=True)
    return out


def format_table(rows: list[dict]) -> str:
    """One line per point; "x 1x" is the stage time over the same method's time on the 1x corpus."""
    lines = [f"{'corpus':<7} {'copies':>6} {'method':<6} {'stored MB':>9} {'files':>5} {'read':>5} {'text MB':>8} "
             f"{'stage s':>7} {'read s':>6} {'train s':>7} {'x 1x':>5} {'c/t fixed':>9} {'c/t own':>8} {'RSS GB':>6}"]
    base = {(r["corpus"], r["method"]): r["seconds"] for r in rows if r["copies"] == 1}
    for r in rows:
        ratio = r["seconds"] / base[(r["corpus"], r["method"])] if (r["corpus"], r["method"]) in base else float("nan")
        lines.append(f"{r['corpus']:<7} {r['copies']:>6} {r['method']:<6} {r['stored_bytes'] / 1e6:>9.1f} "
                     f"{r['files']:>5} {r['sample_read']['files_read']:>5} {r['read_text_bytes'] / 1e6:>8.1f} "
                     f"{r['seconds']:>7.1f} {r['seconds_sampling']:>6.1f} {r['seconds_training']:>7.1f} {ratio:>5.2f} "
                     f"{r['chars_per_token']:>9.4f} {r['chars_per_token_stage_heldout']:>8.4f} "
                     f"{r['peak_rss_bytes'] / 1e9:>6.2f}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora", default="sample,poetry", help=f"of {', '.join(CORPORA)}")
    p.add_argument("--copies", default="1,16,64")
    p.add_argument("--methods", default="old,new")
    p.add_argument("--skip", default="poetry:64:old", help="corpus:copies:method points to leave out (slow)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sample-bytes", type=int, default=0, help="tokenizer.sample_bytes (0: the default)")
    p.add_argument("--out", default="", help="JSON path (default bench/results/tokenizer-sample-<date>.json)")
    p.add_argument("--show", default="", help="print the table of a results JSON and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker)), ensure_ascii=False))
        return 0
    if args.show:
        print(format_table(json.loads(Path(args.show).read_text(encoding="utf-8"))["rows"]), end="")
        return 0

    import tokenizers

    overrides = {"tokenizer.vocab_size": args.vocab}
    if args.sample_bytes:
        overrides["tokenizer.sample_bytes"] = args.sample_bytes
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="bench-tokenizer-sample-"))
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "overrides": overrides,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "tokenizers": tokenizers.__version__}, "rows": []}
    try:
        for name in filter(None, args.corpora.split(",")):
            src = CORPORA[name]
            heldout = work / f"heldout-{name}.json"
            n = fixed_heldout(make_copies(src, 1, work / f"{name}-heldout"), overrides, heldout)
            print(f"{name}: {src}, fixed held-out set of {n} documents", flush=True)
            for k in map(int, args.copies.split(",")):
                corpus = make_copies(src, k, work / f"{name}-{k}x")
                for method in args.methods.split(","):
                    if f"{name}:{k}:{method}" in skip:
                        continue
                    params = {"corpus": str(corpus), "method": method, "overrides": overrides,
                              "heldout": str(heldout), "work": str(work / f"{name}-{k}x-{method}")}
                    res["rows"].append({"corpus": name, "copies": k, "method": method,
                                        **run_child(params, f"{name} {k}x {method}")})
                shutil.rmtree(corpus, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = format_table(res["rows"])
    print("\n" + table, end="")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"tokenizer-sample-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".txt").write_text(table, encoding="utf-8")
    print(f"\nwrote {out} and {out.with_suffix('.txt').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
