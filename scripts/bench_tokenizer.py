#!/usr/bin/env python3
"""Tokenizer and prepare benchmark: ours vs the usual recipe on the same corpus, in one run.

    python scripts/bench_tokenizer.py                        # all shards of ../shared/corpus/poetry, 32k
    python scripts/bench_tokenizer.py --shards 2 --vocab 8000 --skip-recipe   # a quick look
    python scripts/make_modern_corpus.py --out /tmp/modern                       # modern prose
    python scripts/bench_tokenizer.py --shards 3 --modern /tmp/modern --pre zh:4,qwen2:4,gpt-2:4 \
        --skip-recipe --skip-throughput   # pre-tokenizers on poetry and modern prose
    python scripts/make_modern_corpus.py --out /tmp/mixed --mixed                # + Chinese with code
    python scripts/bench_tokenizer.py --shards 3 --modern /tmp/mixed --val-permille 50 --pre-only --prose \
        --pre qwen2:4:0,qwen2:4:24,gpt-2:64:0,qwen2:8:0 --out bench/results/tokenizer-prose-2026-12-03.json

Each variant runs in a subprocess of its own, so its peak RSS (from wait4) is its own:
  recipe       ByteLevel(add_prefix_space=False) + BpeTrainer(vocab, ["<|endoftext|>"]) +
               train_from_iterator over every training text (the baseline of issue 5);
  ours         trainer.data.tokenizer.train_from_corpus, as the `tokenizer` stage calls it;
  ours-small   the same on --small-shards shards: peak RSS follows the sample, not the corpus;
  ours-half    the same on every shard with half the sample: ... and does follow the sample;
  encode_batch raw `Tokenizer.encode_batch` of the in-memory texts, BATCH_DOCS per call (the
               target's reference), and encode_batch_fast (no offsets: what prepare calls);
  prepare      trainer.data.shards.prepare_shards from the files (read, normalise, split, encode, write),
               then once more on --small-shards shards: its memory does not follow the corpus;
  pre          (--pre) the steps of train_from_corpus with each tokenizer.pre_tokenizer,
               max_token_length and max_latin_token_bytes given, on the poetry shards and the --modern
               shards together (one sample of sample_bytes over both), and with --prose also on each
               alone; chars/token on the held-out documents of each source.
Both sides hold out the same validation documents (data.val_permille, by hash) and are measured on
them. Timings on a shared machine are noisy: compare only numbers from the same run (the load
average around each variant is recorded). Prints a table; writes JSON under bench/results/.
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

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "poetry"


# Workers (run in subprocesses) -----------------------------------------------------------------

def _files(params):
    from trainer.data.sources import local_files

    return local_files(params["files"])


def _config(params):
    from trainer.config import load_config

    return load_config(None, {"tokenizer.vocab_size": params["vocab"], "tokenizer.sample_bytes": params["sample_bytes"],
                              "tokenizer.max_token_length": params["max_token_length"],
                              "tokenizer.pre_tokenizer": params.get("pre", "zh"),
                              "data.val_permille": params["val_permille"]}, env={})


def _heldout_stats(tok, heldout: list[str]) -> dict:
    from trainer.data.tokenizer import chars_per_token, longest_tokens

    return {"chars_per_token": round(chars_per_token(tok, heldout), 4), "heldout_documents": len(heldout),
            "heldout_chars": sum(map(len, heldout)), "longest_token_chars": len(longest_tokens(tok, 1)[0]),
            "longest_tokens": longest_tokens(tok, 8), "vocab_size": tok.get_vocab_size()}


def worker_recipe(params) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from trainer.data.readers import iter_documents
    from trainer.data.shards import is_validation

    cfg = _config(params)
    heldout: list[str] = []

    def train_docs():
        for text in iter_documents(cfg.data, _files(params)):
            if is_validation(text, cfg.data.val_permille):
                heldout.append(text)
                continue
            yield text

    start = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=params["vocab"], special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(train_docs(), trainer=trainer)
    return {"seconds": round(time.time() - start, 2), **_heldout_stats(tok, heldout)}


def worker_ours(params) -> dict:
    import dataclasses

    from tokenizers import Tokenizer

    from trainer.data.readers import iter_documents
    from trainer.data.shards import Normalizer, is_validation
    from trainer.data.tokenizer import train_from_corpus

    cfg = _config(params)
    out = Path(params["out_dir"])
    heldout: list[str] = []

    def is_heldout(text):
        if is_validation(text, cfg.data.val_permille):
            heldout.append(text)
            return True
        return False

    start = time.time()
    # As stages.stage_tokenizer: normalised documents (dedup left to prepare), validation held out.
    docs = Normalizer(dataclasses.replace(cfg.data, dedup=False))(iter_documents(cfg.data, _files(params)))
    report = train_from_corpus(cfg, docs, out, is_heldout)
    seconds = time.time() - start
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    return {"seconds": round(seconds, 2), **_heldout_stats(tok, heldout),
            "sample_bytes": report["sample_bytes"], "sample_documents": report["sample_documents"],
            "corpus_train_bytes": report["corpus_train_bytes"], "seconds_sampling": report["seconds_sampling"],
            "seconds_training": report["seconds_training"], "max_token_length": report["max_token_length"],
            "han_chunk": report["han_chunk_chars"]}


def worker_sweep(params) -> dict:
    """The steps of train_from_corpus with a given Han chunk length (not a config setting)."""
    import dataclasses

    from trainer.data.readers import iter_documents
    from trainer.data.shards import Normalizer, is_validation
    from trainer.data.tokenizer import sample_documents, train_tokenizer

    cfg = _config(params)
    heldout: list[str] = []

    def train_docs():
        docs = Normalizer(dataclasses.replace(cfg.data, dedup=False))(iter_documents(cfg.data, _files(params)))
        for text in docs:
            if is_validation(text, cfg.data.val_permille):
                heldout.append(text)
                continue
            yield text

    start = time.time()
    sample = sample_documents(train_docs(), params["sample_bytes"])
    tok = train_tokenizer(sample, params["vocab"], params["max_token_length"], han_chunk=params["han_chunk"])
    return {"seconds": round(time.time() - start, 2), **_heldout_stats(tok, heldout),
            "sample_bytes": sum(len(t.encode()) for t in sample), "han_chunk": params["han_chunk"],
            "max_token_length": params["max_token_length"]}


def worker_pre(params) -> dict:
    """A pre-tokenizer on several sources: one sample over all files, held-out chars/token per source
    (the file name's first word: poetry-00000.jsonl.zst is "poetry")."""
    import dataclasses

    from trainer.data.readers import iter_documents
    from trainer.data.shards import Normalizer, is_validation
    from trainer.data.sources import local_files
    from trainer.data.tokenizer import chars_per_token, sample_documents, train_tokenizer

    cfg = _config(params)
    normalize = Normalizer(dataclasses.replace(cfg.data, dedup=False))
    heldout: dict[str, list[str]] = {}
    trained_chars: dict[str, int] = {}

    def train_docs():
        for f in params["files"] + [f for f in params.get("eval_files", []) if f not in params["files"]]:
            source = Path(f).name.split("-")[0]
            for text in normalize(iter_documents(cfg.data, local_files([f]))):
                if is_validation(text, cfg.data.val_permille):
                    heldout.setdefault(source, []).append(text)
                    continue
                if f in params["files"]:  # eval_files only give held-out text
                    trained_chars[source] = trained_chars.get(source, 0) + len(text)
                    yield text

    start = time.time()
    sample = sample_documents(train_docs(), params["sample_bytes"])
    tok = train_tokenizer(sample, params["vocab"], params["max_token_length"], pre_tokenizer=params["pre"],
                          max_latin_bytes=params.get("latin_bytes", 0))
    seconds = time.time() - start
    texts = {k: heldout[k] for k in sorted(heldout)}
    modern = [t for k, v in texts.items() if k != "poetry" for t in v]
    per_source = {k: round(chars_per_token(tok, v), 4) for k, v in texts.items()}
    if modern and "poetry" in texts:
        per_source["modern"] = round(chars_per_token(tok, modern), 4)
    everything = [t for v in texts.values() for t in v]
    encode_start = time.time()
    tok.encode_batch_fast(everything, add_special_tokens=False)  # what prepare calls
    encode_seconds = time.time() - encode_start
    return {"seconds": round(seconds, 2), "pre": params["pre"], "max_token_length": params["max_token_length"],
            "latin_bytes": params.get("latin_bytes", 0), "train": params.get("train", ""),
            "chars_per_token": per_source, "heldout_chars": {k: sum(map(len, v)) for k, v in texts.items()},
            "corpus_train_chars": trained_chars, "sample_bytes": sum(len(t.encode()) for t in sample),
            "vocab_size": tok.get_vocab_size(), "longest_tokens": longest_tokens_of(tok),
            "encode_chars_per_second": round(sum(map(len, everything)) / encode_seconds)}


def longest_tokens_of(tok) -> list[str]:
    from trainer.data.tokenizer import longest_tokens

    return longest_tokens(tok, 8)


def worker_encode_batch(params) -> dict:
    from tokenizers import Tokenizer

    from trainer.config import DataConfig
    from trainer.data.readers import iter_documents
    from trainer.data.shards import BATCH_DOCS

    tok = Tokenizer.from_file(str(Path(params["tok_dir"]) / "tokenizer.json"))
    encode = getattr(tok, params["method"])  # encode_batch, or encode_batch_fast (no offsets)
    texts = list(iter_documents(DataConfig(), _files(params)))
    start = time.time()
    n_tokens = 0
    for i in range(0, len(texts), BATCH_DOCS):
        n_tokens += sum(len(e.ids) for e in encode(texts[i:i + BATCH_DOCS], add_special_tokens=False))
    seconds = time.time() - start
    chars = sum(map(len, texts))
    return {"seconds": round(seconds, 2), "documents": len(texts), "chars": chars, "tokens": n_tokens,
            "chars_per_second": round(chars / seconds)}


def worker_prepare(params) -> dict:
    from trainer.data.readers import iter_documents
    from trainer.data.shards import prepare_shards
    from trainer.data.tokenizer import load_tokenizer

    cfg = _config(params)
    tok = load_tokenizer(params["tok_dir"])  # as stages.stage_prepare
    start = time.time()
    index = prepare_shards(cfg, iter_documents(cfg.data, _files(params)), tok, Path(params["out_dir"]),
                           progress=False)
    seconds = time.time() - start
    docs = sum(index["documents"].values())
    chars = sum(index["chars"].values()) - docs  # index counts each document's EOS as a character
    return {"seconds": round(seconds, 2), "documents": docs, "chars": chars,
            "tokens": sum(index["tokens"].values()), "filters": index["filters"], "dtype": index["dtype"],
            "chars_per_second": round(chars / seconds)}


WORKERS = {"recipe": worker_recipe, "ours": worker_ours, "sweep": worker_sweep, "prepare": worker_prepare,
           "pre": worker_pre,
           "encode_batch": worker_encode_batch, "encode_batch_fast": worker_encode_batch}  # params["method"]


# The parent ------------------------------------------------------------------------------------

def run_child(kind: str, params: dict, label: str) -> dict:
    """Run one worker in a fresh interpreter; its result plus its own peak RSS and wall time."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        load_before = os.getloadavg()[0]
        start = time.time()
        proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--params", json.dumps(params),
                                 "--result", result.name], cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage, not the max over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: worker exited with {proc.returncode}")
        out = json.loads(Path(result.name).read_text())
    out.update(label=label, kind=kind, process_seconds=round(time.time() - start, 1),
               peak_rss_bytes=usage.ru_maxrss * 1024, loadavg_before=round(load_before, 2),
               loadavg_after=round(os.getloadavg()[0], 2))
    print(f"  {label}: {out['seconds']} s, peak RSS {out['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    return out


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def print_pre_table(rows: list[dict]) -> None:
    sources = sorted({k for v in rows for k in v["chars_per_token"]}, key=lambda k: (k == "modern", k))
    print(f"\n{'trained on':<14} {'pre_tokenizer':<14} {'max tok':>7} {'latin B':>7} "
          + " ".join(f"{s:>8}" for s in sources)
          + f" {'wall s':>7} {'peak RSS GB':>11} {'enc Mchar/s':>11}  (chars/token on held-out text of each source)")
    for v in rows:
        print(f"{v.get('train', ''):<14} {v['pre']:<14} {v['max_token_length']:>7} {v.get('latin_bytes', 0):>7} "
              + " ".join(f"{v['chars_per_token'].get(s, float('nan')):>8.4f}" for s in sources)
              + f" {v['seconds']:>7.1f} {gb(v['peak_rss_bytes']):>11} "
              + f"{v.get('encode_chars_per_second', 0) / 1e6:>11.2f}")


def print_table(res: dict) -> None:
    if res.get("pre"):
        print_pre_table(res["pre"])
    if not res["training"]:
        return
    print(f"\n{'variant':<16} {'shards':>6} {'sample MB':>9} {'max tok':>7} {'chunk':>5} {'wall s':>7} "
          f"{'peak RSS GB':>11} {'chars/token':>11} {'longest':>7}")
    for v in res["training"]:
        sample = "all" if v["kind"] == "recipe" else f"{v['sample_bytes'] / 1e6:.1f}"
        mtl, chunk = (v.get("max_token_length", "-"), v.get("han_chunk", "-"))
        print(f"{v['label']:<16} {v['shards']:>6} {sample:>9} {mtl:>7} {chunk:>5} {v['seconds']:>7.1f} "
              f"{gb(v['peak_rss_bytes']):>11} {v['chars_per_token']:>11.4f} {v['longest_token_chars']:>7}")
    r = res.get("ratios", {})
    if r:
        print(f"\nours / recipe: wall {r['wall']:.3f} (target <= 0.5), peak RSS {r['peak_rss']:.3f} (target <= 0.25), "
              f"chars/token {r['chars_per_token']:.3f} (target >= 1)")
    if not res["throughput"]:
        return
    print(f"\n{'throughput':<18} {'shards':>6} {'run':>4} {'Mchar/s':>8} {'wall s':>7} {'peak RSS GB':>11}")
    for v in res["throughput"]:
        print(f"{v['label']:<18} {v['shards']:>6} {v['run']:>4} {v['chars_per_second'] / 1e6:>8.3f} "
              f"{v['seconds']:>7.1f} {gb(v['peak_rss_bytes']):>11}")
    if "prepare_vs_encode_batch" in res:
        print(f"\nprepare / encode_batch (best of each): {res['prepare_vs_encode_batch']:.3f} (target >= 0.8); "
              f"prepare / encode_batch_fast: {res['prepare_vs_encode_batch_fast']:.3f}")


def run_pre(args, files: list[str], base: dict, work: Path) -> list[dict]:
    """The --pre comparison: one worker per pre_tokenizer:max_token_length[:max_latin_token_bytes].
    With --prose, each on three training sets (poetry + modern, modern alone, poetry alone), every
    one measured on the held-out documents of all sources."""
    modern = sorted(str(f) for f in Path(args.modern).glob("*.jsonl.zst")) if args.modern else []
    trainings = {"poetry+modern": files + modern}
    if args.prose:
        trainings.update({"modern": modern, "poetry": files})
    rows = []
    for train, train_files in trainings.items():
        for point in filter(None, args.pre.split(",")):
            pre, mtl, latin = (point.split(":") + ["", ""])[:3]
            params = {**base, "files": train_files, "eval_files": files + modern, "pre": pre, "train": train,
                      "max_token_length": int(mtl or base["max_token_length"]), "latin_bytes": int(latin or 0),
                      "out_dir": str(work / f"pre-{pre}")}
            rows.append(run_child("pre", params, f"pre {train} {point}"))
    return rows


def main(argv=None) -> int:
    from trainer.config import TokenizerConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="folder of *.jsonl.zst shards")
    p.add_argument("--shards", type=int, default=0, help="use the first N shards (0 = all)")
    p.add_argument("--small-shards", type=int, default=5, help="shards of the smaller corpus (same sample)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sample-bytes", type=int, default=TokenizerConfig.sample_bytes)
    p.add_argument("--max-token-length", type=int, default=TokenizerConfig.max_token_length)
    p.add_argument("--val-permille", type=int, default=5)
    p.add_argument("--repeat", type=int, default=2, help="runs of encode_batch and prepare (alternating)")
    p.add_argument("--skip-recipe", action="store_true", help="leave out the baseline (slow, GBs of RAM)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--sweep", default="", help="also train ours at max_token_length:han_chunk:sample_MB,... "
                                                "(e.g. 4:16:10,4:8:10,2:8:10) and compare")
    p.add_argument("--modern", default="", help="folder of modern-prose *.jsonl.zst (scripts/make_modern_corpus.py)")
    p.add_argument("--pre", default="", help="train each pre_tokenizer:max_token_length,... on the shards and "
                                             "--modern together (e.g. zh:4,qwen2:4,deepseek-llm:4,gpt-2:4)")
    p.add_argument("--pre-only", action="store_true", help="run only the --pre comparison")
    p.add_argument("--prose", action="store_true", help="--pre also trained on --modern alone and on the shards "
                                                        "alone (pre:max_token_length:max_latin_token_bytes points)")
    p.add_argument("--out", default="", help="JSON path (default bench/results/tokenizer-<date>.json)")
    p.add_argument("--keep-work", action="store_true", help="keep the tokenizers and shards in the work dir")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        out = WORKERS[args.worker](json.loads(args.params))
        Path(args.result).write_text(json.dumps(out, ensure_ascii=False))
        return 0

    import tokenizers

    files = sorted(str(f) for f in Path(args.corpus).glob("*.jsonl.zst"))
    if not files:
        raise SystemExit(f"no *.jsonl.zst under {args.corpus}")
    files = files[: args.shards] if args.shards else files
    small = files[: min(args.small_shards, len(files))]
    base = {"vocab": args.vocab, "sample_bytes": args.sample_bytes, "max_token_length": args.max_token_length,
            "val_permille": args.val_permille}
    work = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "tokenizers": tokenizers.__version__},
           "corpus": {"path": args.corpus, "shards": len(files), "small_shards": len(small),
                      "bytes_compressed": sum(os.path.getsize(f) for f in files)},
           "settings": base, "training": [], "throughput": []}
    print(f"corpus: {len(files)} shards of {args.corpus}; vocab {args.vocab}, sample {args.sample_bytes / 1e6:.1f} MB, "
          f"max_token_length {args.max_token_length}; work dir {work}", flush=True)

    if args.pre:
        res["pre"] = run_pre(args, files, base, work)
        res["corpus"]["modern"] = args.modern
    plan = [] if args.pre_only else [("ours", "ours", files, base)]
    if not args.skip_recipe and not args.pre_only:
        plan.insert(0, ("recipe", "recipe", files, base))
    if len(small) < len(files) and plan:
        plan.append(("ours", "ours-small", small, base))
    if plan:
        plan.append(("ours", "ours-half", files, {**base, "sample_bytes": args.sample_bytes // 2}))
    for kind, label, fs, settings in plan:
        params = {**settings, "files": fs, "out_dir": str(work / label)}
        res["training"].append({**run_child(kind, params, label), "shards": len(fs)})

    for point in filter(None, args.sweep.split(",")):
        mtl, chunk, mb = point.split(":")
        params = {**base, "files": files, "max_token_length": int(mtl), "han_chunk": int(chunk),
                  "sample_bytes": int(float(mb) * 1e6)}
        res["training"].append({**run_child("sweep", params, f"sweep {point}"), "shards": len(files)})

    by = {v["label"]: v for v in res["training"]}
    if "recipe" in by:
        rec, ours = by["recipe"], by["ours"]
        res["ratios"] = {"wall": round(ours["seconds"] / rec["seconds"], 4),
                         "peak_rss": round(ours["peak_rss_bytes"] / rec["peak_rss_bytes"], 4),
                         "chars_per_token": round(ours["chars_per_token"] / rec["chars_per_token"], 4)}

    if not args.skip_throughput and not args.pre_only:
        tok_dir = str(work / "ours")
        for run in range(1, args.repeat + 1):  # alternating, so a burst of load hits each side alike
            for kind in ("encode_batch", "encode_batch_fast", "prepare"):
                params = {**base, "files": files, "tok_dir": tok_dir, "out_dir": str(work / f"prepare-{run}"),
                          "method": kind}
                res["throughput"].append({**run_child(kind, params, kind), "run": run, "shards": len(files)})
        if len(small) < len(files):
            params = {**base, "files": small, "tok_dir": tok_dir, "out_dir": str(work / "prepare-small")}
            res["throughput"].append({**run_child("prepare", params, "prepare-small"), "run": 1, "shards": len(small)})
        best = {k: max(v["chars_per_second"] for v in res["throughput"] if v["label"] == k)
                for k in ("encode_batch", "encode_batch_fast", "prepare")}
        res["prepare_vs_encode_batch"] = round(best["prepare"] / best["encode_batch"], 4)
        res["prepare_vs_encode_batch_fast"] = round(best["prepare"] / best["encode_batch_fast"], 4)

    print_table(res)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"tokenizer-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
