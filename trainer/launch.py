"""The job's stages, each skipped when its output is already in the bucket, and the torchrun launch.

pull -> tokenizer -> prepare -> pretrain (torchrun workers) -> export -> samples.
Each stage function takes the Config and returns what later stages need; `run` chains them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainer import checkpoint as ckpt
from trainer.config import Config, ConfigError, to_yaml
from trainer.data import DocumentReader, corpus_fingerprint, iter_documents, pull, resolve_sources
from trainer.storage import Storage, is_s3, join, open_storage, split_url

ROOT = Path(__file__).resolve().parent.parent
EXIT_PREEMPTED = 75  # as trainer.train.EXIT_PREEMPTED (not imported from there: train.py imports torch)
PREEMPTED_MARKER = "preempted.json"  # local_dir/runs/<id>/: the workers' final checkpoint is published


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bucket(cfg: Config) -> Storage:
    return open_storage(cfg.storage.bucket, cfg.storage)


@dataclass(frozen=True)
class Artifacts:
    tokenizer_key: str  # bucket key of the tokenizer folder
    data_key: str  # bucket key of the packed shards folder

    def to_json(self) -> str:
        return json.dumps({"tokenizer_key": self.tokenizer_key, "data_key": self.data_key})

    @classmethod
    def from_json(cls, text: str) -> "Artifacts":
        return cls(**json.loads(text))


def wait_for(store: Storage, key: str, what: str, timeout_s: float = 6 * 3600):
    """Nodes other than 0 wait for node 0 to publish a shared artifact instead of racing it."""
    deadline = time.time() + timeout_s
    while not store.exists(key):
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what} at {store.url(key)} from node 0")
        time.sleep(5)


def node_rank() -> int:
    return int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)


# Stage 1: pull ---------------------------------------------------------------------------------

def stage_pull(cfg: Config):
    files = resolve_sources(cfg)
    total = sum(f.size for f in files)
    log(f"pull: {len(files)} corpus file(s), {total / 1e6:.1f} MB")
    return pull(cfg, files)


# Stage 2: tokenizer ----------------------------------------------------------------------------

def stage_tokenizer(cfg: Config, files=None) -> str:
    """Bucket key of the tokenizer folder: loaded from tokenizer.path, reused by hash, or trained."""
    from trainer.prepare import is_validation, Normalizer
    from trainer.tokenizer import tokenizer_hash, train_from_corpus

    store = bucket(cfg)
    if cfg.tokenizer.path:
        return import_tokenizer(cfg, store)
    files = files if files is not None else stage_pull(cfg)
    key = f"tokenizers/{tokenizer_hash(cfg, corpus_fingerprint(files))}"
    if store.exists(join(key, ckpt.MANIFEST)):
        log(f"tokenizer: reusing {store.url(key)}")
        return key
    if node_rank() != 0:
        wait_for(store, join(key, ckpt.MANIFEST), "the tokenizer")
        return key
    out = Path(cfg.storage.local_dir) / key
    shutil.rmtree(out, ignore_errors=True)
    reader = DocumentReader(cfg.data)
    # The tokenizer trains on normalised text without validation documents (no leak into val bpc);
    # dedup is left to prepare (it doesn't change which strings are frequent enough to merge).
    norm = Normalizer(dataclasses.replace(cfg.data, dedup=False))
    docs = norm(iter_documents(cfg.data, files, reader))
    log(f"tokenizer: training vocab {cfg.tokenizer.vocab_size} on up to {cfg.tokenizer.sample_bytes / 1e6:.1f} MB")
    report = train_from_corpus(cfg, docs, out, lambda t: is_validation(t, cfg.data.val_permille))
    report["skipped_records"] = dict(reader.skipped)
    report["filters"] = dict(norm.counts)
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    ckpt.publish_folder(store, out, key)
    log(f"tokenizer: vocab {report['vocab_size']}, {report['chars_per_token_heldout']} chars/token held out, "
        f"{report['seconds']}s -> {store.url(key)}")
    return key


def import_tokenizer(cfg: Config, store: Storage) -> str:
    """Copy an existing Hugging Face tokenizer (local folder or s3://) into the bucket by content hash."""
    import hashlib

    src = cfg.tokenizer.path
    local = Path(cfg.storage.local_dir) / "tokenizer-import"
    shutil.rmtree(local, ignore_errors=True)
    if is_s3(src):
        s, k = split_url(src, cfg.storage)
        s.download_dir(k, local)
    else:
        if not (Path(src) / "tokenizer.json").is_file() and not (Path(src) / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"tokenizer.path: {src} is not a Hugging Face tokenizer folder")
        shutil.copytree(src, local)
    from trainer.tokenizer import EOS, load_tokenizer

    tok = load_tokenizer(local)
    if EOS not in tok.get_vocab() and tok.eos_token is None:
        raise ValueError(f"tokenizer.path: {src} has no end-of-text token; pretraining needs one")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file())).hexdigest()
    key = f"tokenizers/import-{digest[:16]}"
    if not store.exists(join(key, ckpt.MANIFEST)):
        ckpt.publish_folder(store, local, key)
    log(f"tokenizer: using {src} -> {store.url(key)}")
    return key


def fetch_folder(store: Storage, key: str, local_root: Path) -> Path:
    """Download a bucket folder once per machine (a file lock serialises local ranks)."""
    dest = local_root / key
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store.download_dir(key, dest)
    return dest


# Stage 3: prepare ------------------------------------------------------------------------------

def stage_prepare(cfg: Config, files=None, tokenizer_key: str | None = None) -> Artifacts:
    from trainer.prepare import data_hash, prepare_shards, tokenizer_fingerprint
    from trainer.tokenizer import load_tokenizer

    store = bucket(cfg)
    files = files if files is not None else stage_pull(cfg)
    tokenizer_key = tokenizer_key or stage_tokenizer(cfg, files)
    tok_dir = fetch_folder(store, tokenizer_key, Path(cfg.storage.local_dir))
    key = f"data/{data_hash(cfg, corpus_fingerprint(files), tokenizer_fingerprint(tok_dir))}"
    arts = Artifacts(tokenizer_key, key)
    if store.exists(join(key, "index.json")):
        log(f"prepare: reusing {store.url(key)}")
        return arts
    if node_rank() != 0:
        wait_for(store, join(key, "index.json"), "the token shards")
        return arts
    out = Path(cfg.storage.local_dir) / key
    shutil.rmtree(out, ignore_errors=True)
    reader = DocumentReader(cfg.data)
    index = prepare_shards(cfg, iter_documents(cfg.data, files, reader), load_tokenizer(tok_dir), out)
    index["skipped_records"] = dict(reader.skipped)
    index["tokenizer_key"] = tokenizer_key
    (out / "index.json").write_text(json.dumps(index, indent=1))
    store.upload_dir(out, key, skip=("index.json",))
    store.upload_file(out / "index.json", join(key, "index.json"))  # last: the folder counts from now
    log(f"prepare: {index['tokens']['train']:,} train / {index['tokens']['val']:,} val tokens "
        f"({index['dtype']}), filters {index['filters']}, skipped {index['skipped_records']} -> {store.url(key)}")
    return arts


# Stage 4: pretrain (torchrun) ------------------------------------------------------------------

def default_nproc(cfg: Config) -> int:
    if cfg.train.nproc:
        return cfg.train.nproc
    if os.environ.get("NPROC"):
        return int(os.environ["NPROC"])
    import torch

    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def stage_pretrain(cfg: Config, arts: Artifacts | None = None, lease=None) -> int:
    """Launch torchrun with the resolved config; returns 0, 75 (preempted: rerun to resume) or the
    failure code. Holds the run's lease on node 0 unless the caller (`run`) already does."""
    done = ckpt.complete_steps(bucket(cfg), cfg.run.id)
    if done and done[0] >= cfg.train.max_steps:
        log(f"pretrain: {ckpt.step_name(done[0])} is published (train.max_steps={cfg.train.max_steps}); "
            f"nothing to train")
        return 0
    if lease is None and node_rank() == 0:  # `pretrain` alone: check and hold the lease here
        check_before_start(cfg)
        lease = hold_lease(cfg)
        try:
            return stage_pretrain(cfg, arts, lease)
        finally:
            lease.release()
    arts = arts or stage_prepare(cfg)
    run_local = Path(cfg.storage.local_dir) / "runs" / cfg.run.id
    run_local.mkdir(parents=True, exist_ok=True)
    cfg_path, arts_path = run_local / "resolved.yaml", run_local / "artifacts.json"
    cfg_path.write_text(to_yaml(cfg), encoding="utf-8")
    arts_path.write_text(arts.to_json())
    bucket(cfg).write_text(f"runs/{cfg.run.id}/config.yaml", to_yaml(cfg))
    bucket(cfg).write_text(f"runs/{cfg.run.id}/artifacts.json", arts.to_json())  # for the report
    nproc = default_nproc(cfg)
    nnodes = int(os.environ.get("NNODES", "1") or 1)
    (run_local / PREEMPTED_MARKER).unlink(missing_ok=True)
    code, signalled = torchrun(nproc, nnodes, [str(ROOT / "entrypoint.py"), "worker", f"--config={cfg_path}",
                                               f"--artifacts={arts_path}"], lease, cfg.train.grace_seconds, "pretrain")
    return pretrain_exit_code(cfg, code, signalled)


def torchrun(nproc: int, nnodes: int, tail: list[str], lease, grace_seconds: int, what: str) -> tuple[int, bool]:
    """Run `python -m torch.distributed.run ... <tail>` (standalone, or the multi-node rendezvous
    of NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT) until it exits; return (exit code, whether a
    SIGTERM/SIGINT was forwarded). Signals go to torchrun, which passes them to its workers; they
    checkpoint and exit 75. If another job takes the run's lease, the workers are killed at once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1 or os.environ.get("MASTER_ADDR"):
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank()}",
                f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
                f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]
    else:
        cmd += ["--standalone"]
    log(f"{what}: {' '.join(cmd[2:5])} ... ({nnodes} node(s) x {nproc} process(es))")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    # torchrun SIGKILLs workers this long after passing on a SIGTERM (torch >= 2.8 reads it; before, 30 s).
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(grace_seconds + 5))
    proc = subprocess.Popen(cmd + tail, env=env)
    signalled = []

    def forward(signum, frame):  # torchrun forwards to its workers, which checkpoint and exit 75
        signalled.append(signum)
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait(timeout=2)
                break
            except subprocess.TimeoutExpired:
                if lease is not None and lease.lost.is_set():
                    log(f"{what}: another job took this run over: killing the workers without a checkpoint")
                    _kill_tree(proc.pid)
                    proc.wait()
                    lease.check()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return code, bool(signalled)


def pretrain_exit_code(cfg: Config, code: int, signalled: bool) -> int:
    """torchrun exits 1 when its workers exit 75 after a SIGTERM (it counts them as failed), so the
    workers leave a marker once their final checkpoint is published, and this checks the bucket."""
    marker = Path(cfg.storage.local_dir) / "runs" / cfg.run.id / PREEMPTED_MARKER
    if code == 0:
        return 0
    if marker.is_file():
        step = json.loads(marker.read_text())["step"]
        store = bucket(cfg)
        steps = ckpt.complete_steps(store, cfg.run.id)
        latest = (store.read_text_or_none(join(ckpt.checkpoints_prefix(cfg.run.id), ckpt.LATEST)) or "").strip()
        if steps and steps[0] == step and latest == ckpt.step_name(step):
            log(f"pretrain: preempted; checkpoint {ckpt.step_name(step)} is published and LATEST names it")
            return EXIT_PREEMPTED
        log(f"pretrain: the workers stopped at step {step} but the bucket's newest checkpoint is "
            f"{ckpt.step_name(steps[0]) if steps else 'none'} (LATEST {latest or 'absent'})")
        return code if code > 0 else 1
    if signalled:
        log("pretrain: stopped by a signal before a final checkpoint; the rerun resumes from the newest "
            "complete one")
        return EXIT_PREEMPTED
    return code if code > 0 else 1


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts workers in sessions of their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def hold_lease(cfg: Config):
    """Node 0 takes runs/<id>/lease.json (waiting out a holder that stopped renewing, refusing a
    live one unless run.takeover); other nodes follow node 0 and hold nothing."""
    if node_rank() != 0:
        return None
    from trainer.lease import Lease

    return Lease(bucket(cfg), cfg.run.id, cfg.run.lease_seconds, log=log).acquire(takeover=cfg.run.takeover)


def check_before_start(cfg: Config) -> None:
    """Settings that depend on this machine (the process count) are checked before any download."""
    from trainer.train import check_batch_geometry

    try:
        check_batch_geometry(cfg, default_nproc(cfg) * int(os.environ.get("NNODES", "1") or 1))
    except ValueError as e:
        raise ConfigError(f"invalid configuration:\n  {e}") from None


def _preempted_between_stages(signum, frame):
    log(f"received signal {signum} between stages: exiting with {EXIT_PREEMPTED} (rerun to continue; "
        f"finished stages are reused)")
    raise SystemExit(EXIT_PREEMPTED)


def worker(cfg: Config, arts: Artifacts) -> dict:
    """One torchrun process: fetch the shards to this machine, then train."""
    from trainer.train import shutdown_distributed, train

    store = bucket(cfg)
    local_root = Path(cfg.storage.local_dir)
    data_dir = fetch_folder(store, arts.data_key, local_root)
    tok_dir = fetch_folder(store, arts.tokenizer_key, local_root)
    index = json.loads((data_dir / "index.json").read_text())
    try:
        return train(cfg, store, data_dir, index, tok_dir, log=lambda m, **k: log(m))
    finally:
        shutdown_distributed()


# Stage 5: export -------------------------------------------------------------------------------

def final_key(cfg: Config) -> str:
    return f"runs/{cfg.run.id}/final"


def stage_export(cfg: Config, arts: Artifacts | None = None) -> str:
    """Hugging Face model folder from the newest checkpoint at runs/<id>/final/ (manifest last)."""
    from safetensors.torch import load_model

    from trainer.model import build_model, llama_config
    from trainer.tokenizer import load_tokenizer

    store = bucket(cfg)
    key = final_key(cfg)
    if ckpt.newest_to_export(store, cfg.run.id, key, "export") is None:
        log(f"export: {store.url(key)} is up to date")
        return key
    arts = arts or stage_prepare(cfg)
    local_root = Path(cfg.storage.local_dir)
    tok = load_tokenizer(fetch_folder(store, arts.tokenizer_key, local_root))
    index = json.loads(store.read_text(join(arts.data_key, "index.json")))
    step, ckpt_dir = ckpt.fetch_newest(store, cfg.run.id, local_root / "runs" / cfg.run.id / "export-src", log=log)
    model_cfg = llama_config(cfg.model.preset, index["vocab_size"], cfg.train.seq_len, cfg.model.tie_embeddings,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(model_cfg, "sdpa")
    load_model(model, str(ckpt_dir / "model.safetensors"))
    out = local_root / key
    shutil.rmtree(out, ignore_errors=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    ckpt.publish_folder(store, out, key, step, replace=True)
    log(f"export: step {step} -> {store.url(key)}")
    return key


def run(cfg: Config) -> int:
    """The whole job. Returns the process exit code (0 done, 75 preempted: rerun to resume).
    Node 0 holds the run's lease throughout; SIGTERM outside pretraining exits 75 at once."""
    check_before_start(cfg)
    old = {s: signal.signal(s, _preempted_between_stages) for s in (signal.SIGTERM, signal.SIGINT)}
    lease = hold_lease(cfg)
    try:
        return run_stages(cfg, lease)
    finally:
        if lease is not None:
            lease.release()
        for s, h in old.items():
            signal.signal(s, h)


def run_stages(cfg: Config, lease=None) -> int:
    files = stage_pull(cfg)
    tok_key = stage_tokenizer(cfg, files)
    arts = stage_prepare(cfg, files, tok_key)
    code = stage_pretrain(cfg, arts, lease)
    if code != 0:
        log(f"pretrain exited with {code}" + (" (preempted: run the same command again to resume)" if code == 75 else ""))
        return code
    if node_rank() != 0:
        return 0
    lease.check()
    key = stage_export(cfg, arts)
    report_key = stage_report(cfg, files)
    store = bucket(cfg)
    log(f"done. bucket: {store.url()}  run: {store.url(f'runs/{cfg.run.id}')}  model: {store.url(key)}  "
        f"report: {store.url(join(report_key, 'report.md'))}")
    if cfg.sft.after_pretrain:
        from trainer.sft import stage_sft

        return stage_sft(cfg)
    return 0


# Stage 6: report -------------------------------------------------------------------------------

def stage_report(cfg: Config, files=None) -> str:
    """runs/<id>/report/: report.md with plots of the logged metrics, an evaluation of the export
    (held-out bits per character, samples, degeneration metrics beside the human text's), the
    samples taken at checkpoints, and TensorBoard event files. Rewritten on every call; the
    evaluation is reused while the export it judged is still the newest."""
    from trainer.evaluate import evaluate_model, heldout_documents
    from trainer.generate import load_for_generation
    from trainer.report import write_run_report

    store = bucket(cfg)
    key = f"runs/{cfg.run.id}/report"
    out = Path(cfg.storage.local_dir) / key
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    summary = {"run": cfg.run.id, "model": cfg.model.preset, "schedule": cfg.train.schedule, "lr": cfg.train.lr,
               "steps": cfg.train.max_steps, "batch tokens": cfg.train.batch_tokens, "seq len": cfg.train.seq_len}
    arts = store.read_text_or_none(f"runs/{cfg.run.id}/artifacts.json")
    index = store.read_text_or_none(join(Artifacts.from_json(arts).data_key, "index.json")) if arts else None
    if index:  # what the corpus filters removed and which bad records data.on_error=skip skipped
        index = json.loads(index)
        summary["corpus documents: read / kept"] = (f"{index['filters'].get('documents_read', 0):,} / "
                                                    f"{index['filters'].get('documents_kept', 0):,}")
        removed = {k: v for k, v in index["filters"].items() if k.startswith("removed")}
        summary["documents removed by filters"] = ", ".join(f"{k}: {v:,}" for k, v in removed.items()) or "none"
        summary["bad records skipped"] = ", ".join(f"{k}: {v:,}" for k, v in
                                                   index.get("skipped_records", {}).items()) or "none"
    ev = None
    export = store.read_text_or_none(join(final_key(cfg), ckpt.MANIFEST))
    if export:
        export_step = json.loads(export)["step"]
        old = store.read_text_or_none(join(key, "eval.json"))
        ev = json.loads(old) if old else None
        if not ev or ev.get("export_step") != export_step:
            model, tok = load_for_generation(store.url(final_key(cfg)), cfg)
            s = cfg.sample
            files = files if files is not None else stage_pull(cfg)
            docs = heldout_documents(cfg, files, s.eval_chars, s.heldout_prompts)
            ev = {"export_step": export_step, **evaluate_model(model, tok, cfg, docs)}
        (out / "eval.json").write_text(json.dumps(ev, ensure_ascii=False, indent=1), encoding="utf-8")
    write_run_report(out, store.read_text_or_none(f"runs/{cfg.run.id}/metrics.jsonl") or "", summary, ev,
                     store.read_text_or_none(f"runs/{cfg.run.id}/samples.jsonl") or "")
    store.delete_prefix(key + "/")
    store.upload_dir(out, key)
    log(f"report: {store.url(join(key, 'report.md'))}")
    if ev and ev.get("samples"):
        log("samples from the exported model:")
        for x in ev["samples"]:
            print(f"--- {x['prompt']}\n{x['prompt']}{x['text']}\n", flush=True)
    return key
