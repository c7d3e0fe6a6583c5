"""The job's stages, each skipped when its output is already in the bucket.

pull -> tokenizer -> prepare -> pretrain (the training processes) -> export -> report; sft.
Each stage function takes the Config and returns what later stages need; trainer/job/run.py chains them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from trainer.config import Config, ConfigError, model_label, shape_overrides, to_yaml
from trainer.data import mixture, prepare_pool
from trainer.data import shards as prepare
from trainer.data import tokenizer as tokenizers
from trainer.data.conversations import load_chat_tokenizer, prepare_conversations, sft_run_id
from trainer.data.readers import DocumentReader
from trainer.data.remote import Remote, is_remote
from trainer.data.sample import describe_read, read_sample, sample_key
from trainer.data.shards import Normalizer, data_hash, is_validation, tokenizer_fingerprint
from trainer.data.sources import PulledOnDemand, corpus_fingerprint, pull, resolve_sources
from trainer.data.tokenizer import load_tokenizer, tokenizer_hash
from trainer.errors import EXIT_PREEMPTED, signals_held, stop_on_signals
from trainer.evaluation.evaluate import evaluate_model, heldout_documents
from trainer.evaluation.generate import load_for_generation
from trainer.evaluation.report import write_run_report
from trainer.io.artifacts import Artifacts, bucket, fetch_folder, wait_for
from trainer.io.lease import Lease
from trainer.io.scratch import check_scratch_apart, claim_scratch
from trainer.io.storage import Storage, is_s3, join, split_url
from trainer.log import logger
from trainer.model import hf_init
from trainer.parallel.distributed import default_nproc, node_rank, num_nodes
from trainer.state import checkpoint as ckpt
from trainer.state import protocol
from trainer.state import run as run_state
from trainer.training.launch import launch
from trainer.training.loop import batch_geometry
from trainer.training.optim import muon_available
from trainer.training.parallelize import float8_available
from trainer.training.tasks import pretrain_inputs, sft_inputs
from trainer.training.worker import pretrain_worker, sft_worker

log = logger.info


# Stage 1: pull ---------------------------------------------------------------------------------

def stage_pull(cfg: Config):
    files = resolve_sources(cfg)
    total = sum(f.size for f in files)
    remote = sum(is_s3(f.url) for f in files)
    log(f"pull: {len(files)} corpus file(s), {total / 1e6:.1f} MB" +
        (f"; {remote} in S3 stay there, read by range as prepare needs them" if remote else ""))
    return pull(cfg, files, stream=True)


# model.init: continued pretraining ---------------------------------------------------------------

def init_model_dir(cfg: Config) -> tuple[Path, dict]:
    """(model.init's folder on this machine, its config.json), fetched (a local folder as it is; a
    bucket folder, a run's export or checkpoint, or a Hub id into storage.local_dir/models/) and
    checked: a LlamaForCausalLM whose config.json agrees with the model.* numbers and train.seq_len
    set (hf_init.conflicts; ConfigError, exit 2, naming them). model.preset is not used: the shape
    is the init's, and the log says so."""
    try:
        folder = ckpt.model_dir(cfg.model.init, cfg.storage, Path(cfg.storage.local_dir))
    except FileNotFoundError as e:
        raise ConfigError(f"model.init: {e}") from None
    hf = hf_init.read_config(folder, cfg.model.init)
    hf_init.refuse(hf_init.conflicts(cfg, hf))
    log(f"model.init: continuing {cfg.model.init} ({hf_init.description(hf)}; its config.json gives the shape, "
        f"model.preset={cfg.model.preset} is not used)")
    return folder, hf


def init_model(cfg: Config, n_tokens: int) -> dict | None:
    """What the training processes start from with model.init (None without): its folder, its
    config.json and its weights' fingerprint (recorded in the checkpoints' inputs), after checking
    that the embedding covers the tokenizer's n_tokens."""
    if not cfg.model.init:
        return None
    folder, hf = init_model_dir(cfg)
    hf_init.refuse(hf_init.conflicts(cfg, hf, n_tokens))
    return {"url": cfg.model.init, "dir": str(folder), "config": hf, "fingerprint": hf_init.fingerprint(folder)}


# Stage 2: tokenizer ----------------------------------------------------------------------------

def trained_tokenizer_key(cfg: Config, files, store: Storage | None = None) -> str:
    """Bucket key of the tokenizer trained on `files`: the listing, the settings and how the sample is read.

    Migration (logged): a corpus larger than the spread read's budget had its tokenizer trained on a
    whole-corpus read before the spread read existed, under the key without a sample part. When
    `store` holds that tokenizer and not the new key's, it is the tokenizer of these inputs and is
    kept, so a run started before the change resumes on the same token ids instead of being refused."""
    fp = corpus_fingerprint(files)
    key = f"tokenizers/{tokenizer_hash(cfg, fp, sample_key(files, cfg.tokenizer.sample_bytes))}"
    legacy = f"tokenizers/{tokenizer_hash(cfg, fp)}"
    if store is not None and key != legacy and not store.exists(join(key, protocol.MANIFEST)) \
            and store.exists(join(legacy, protocol.MANIFEST)):
        log(f"tokenizer: {store.url(legacy)} was trained on a whole-corpus read (before the spread read); "
            f"kept for these inputs (delete it to train one on the spread read)")
        return legacy
    return key


def stage_tokenizer(cfg: Config, files=None) -> str:
    """Bucket key of the tokenizer folder: model.init's own tokenizer, loaded from tokenizer.path,
    reused by hash, or trained on a bounded, evenly spread read of the corpus (trainer/data/sample.py)."""
    store = bucket(cfg)
    if cfg.model.init:  # continued pretraining: the model's own tokenizer, nothing trained
        return import_tokenizer(cfg, store, str(init_model_dir(cfg)[0]), TOKENIZER_FILES)
    if cfg.tokenizer.path:
        return import_tokenizer(cfg, store, cfg.tokenizer.path)
    files = files if files is not None else stage_pull(cfg)
    key = trained_tokenizer_key(cfg, files, store)
    if store.exists(join(key, protocol.MANIFEST)):
        log(f"tokenizer: reusing {store.url(key)}")
        return key
    if node_rank() != 0:
        wait_for(store, join(key, protocol.MANIFEST), "the tokenizer")
        return key
    out = Path(cfg.storage.local_dir) / key
    shutil.rmtree(out, ignore_errors=True)
    reader = DocumentReader(cfg.data)
    # The tokenizer trains on normalised text without validation documents (no leak into val bpc);
    # dedup is left to prepare (it doesn't change which strings are frequent enough to merge).
    norm = Normalizer(dataclasses.replace(cfg.data, dedup=False))
    remote = Remote(cfg.storage, Path(cfg.storage.local_dir) / "sample") if any(map(is_remote, files)) else None
    docs = norm(read_sample(cfg.data, files, cfg.tokenizer.sample_bytes, reader, remote=remote))
    read = describe_read(files, cfg.tokenizer.sample_bytes)
    log(f"tokenizer: training vocab {cfg.tokenizer.vocab_size} on up to {cfg.tokenizer.sample_bytes / 1e6:.1f} MB "
        f"drawn from {read['files_read']} of {len(files)} file(s)" +
        (f", about {read['planned_bytes'] / 1e6:.1f} MB read" if read["mode"] == "spread" else ", read whole"))
    # A signal while it reads and trains stops at once (train_from_corpus: exit 75, nothing published);
    # one after the merges waits for the publish (a few MB), so the rerun reuses the tokenizer.
    with signals_held(lambda signum: f"tokenizer: received signal {signum} after training: "
                      f"{store.url(key)} is published, the rerun reuses it (exit 75)"):
        report = tokenizers.train_from_corpus(cfg, docs, out, lambda t: is_validation(t, cfg.data.val_permille))
        report["sample_read"] = read
        report["skipped_records"] = dict(reader.skipped)
        report["filters"] = dict(norm.counts)
        (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
        protocol.publish_folder(store, out, key)
    log(f"tokenizer: vocab {report['vocab_size']}, {report['chars_per_token_heldout']} chars/token held out, "
        f"{report['seconds']}s -> {store.url(key)}")
    return key


# The files of a Hugging Face tokenizer, as transformers' tokenizers save and read them: what
# model.init's folder gives the tokenizer stage (its weights stay out of the tokenizer's folder).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def import_tokenizer(cfg: Config, store: Storage, src: str, only: tuple[str, ...] = ()) -> str:
    """Copy an existing Hugging Face tokenizer (local folder or s3://) into the bucket by content
    hash: the whole folder (tokenizer.path), or its files named in `only` (model.init's folder)."""
    local = Path(cfg.storage.local_dir) / "tokenizer-import"
    shutil.rmtree(local, ignore_errors=True)
    if is_s3(src):
        s, k = split_url(src, cfg.storage)
        s.download_dir(k, local)
    else:
        if not (Path(src) / "tokenizer.json").is_file() and not (Path(src) / "tokenizer_config.json").is_file():
            error = ConfigError if only else FileNotFoundError
            raise error(f"{'model.init' if only else 'tokenizer.path'}: {src} is not a Hugging Face tokenizer folder")
        if only:
            local.mkdir(parents=True)
            for name in only:
                if (Path(src) / name).is_file():
                    shutil.copy2(Path(src) / name, local / name)
        else:
            shutil.copytree(src, local)
    tok = load_tokenizer(local)
    prepare.document_separator(tok)  # ConfigError naming tokenizer.path when it has no end-of-text token
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file())).hexdigest()
    key = f"tokenizers/import-{digest[:16]}"
    if not store.exists(join(key, protocol.MANIFEST)):
        protocol.publish_folder(store, local, key)
    log(f"tokenizer: using {src} -> {store.url(key)}")
    return key


# Stage 3: prepare ------------------------------------------------------------------------------

def stage_prepare(cfg: Config, files=None, tokenizer_key: str | None = None) -> Artifacts:
    store = bucket(cfg)
    files = files if files is not None else stage_pull(cfg)
    tokenizer_key = tokenizer_key or stage_tokenizer(cfg, files)
    tok_dir = fetch_folder(store, tokenizer_key, Path(cfg.storage.local_dir))
    key = f"data/{data_hash(cfg, corpus_fingerprint(files), tokenizer_fingerprint(tok_dir))}"
    arts = Artifacts(tokenizer_key, key)
    if store.exists(join(key, "index.json")):
        log(f"prepare: reusing {store.url(key)}")
        return arts
    index = prepare_pool.prepare_into_bucket(cfg, files, load_tokenizer(tok_dir), store, key,
                                             {"tokenizer_key": tokenizer_key}, node_rank(), num_nodes())
    if index is None:  # another node: its share of the units is in the bucket; node 0 assembles
        wait_for(store, join(key, "index.json"), "the token shards")
        return arts
    log(f"prepare: {index['tokens']['train']:,} train / {index['tokens']['val']:,} val tokens "
        f"({index['dtype']}), filters {index['filters']}, skipped {index['skipped_records']} -> {store.url(key)}")
    return arts


def prepare_inputs(cfg: Config, files=None, tokenizer_key: str | None = None) -> Artifacts:
    """stage_prepare; with data.weights once per source (mixture.components), with the one tokenizer of all files."""
    if not cfg.data.weights:
        return stage_prepare(cfg, files, tokenizer_key)
    tokenizer_key = tokenizer_key or stage_tokenizer(cfg, files)
    keys = tuple(stage_prepare(c, None, tokenizer_key).data_key for c in mixture.components(cfg))
    return Artifacts(tokenizer_key, "", keys)


# Stage 4: pretrain ------------------------------------------------------------------------------

def nproc_nnodes(cfg: Config) -> tuple[int, int]:
    return default_nproc(cfg.train.nproc, cfg.train.device), num_nodes()


def check_before_start(cfg: Config) -> None:
    """Settings that depend on this machine (the process count) are checked before any download."""
    nproc, nnodes = nproc_nnodes(cfg)
    try:
        batch_geometry(cfg.train.batch_tokens // cfg.train.seq_len, nproc * nnodes, cfg.train.micro_batch_size)
        if cfg.train.optimizer == "muon":
            muon_available()
        if cfg.train.float8:
            float8_available(cfg.train.device)
    except ValueError as e:
        raise ConfigError(f"invalid configuration:\n  {e}") from None


def hold_lease(cfg: Config, run_id: str | None = None):
    """Node 0 takes runs/<id>/lease.json (waiting out a holder that stopped renewing, refusing a
    live one unless run.takeover); other nodes follow node 0 and hold nothing. Every node first claims
    its local_dir/runs/<id>/ for this bucket (scratch.claim_scratch: ConfigError if another bucket's run is there)."""
    claim_scratch(cfg.storage, run_id or cfg.run.id)
    if node_rank() != 0:
        return None
    return Lease(bucket(cfg), run_id or cfg.run.id, cfg.run.lease_seconds).acquire(takeover=cfg.run.takeover)


def check_resume(cfg: Config, run_id: str, inputs: dict) -> None:
    """run_state.check_resume against this config's bucket (ConfigError, exit 2, when the inputs changed)."""
    run_state.check_resume(bucket(cfg), run_id, inputs, cfg.run.resume_on_new_data)


def check_tokenizer_kept(cfg: Config, files) -> None:
    """Before a tokenizer is trained for a run that has a checkpoint: when the corpus or tokenizer
    settings changed, a new tokenizer would be trained and every token id could change meaning, so
    refuse now (check_resume's error) instead of after minutes of tokenizer training."""
    store = bucket(cfg)
    old = store.read_text_or_none(f"runs/{cfg.run.id}/artifacts.json")
    if cfg.tokenizer.path or cfg.model.init or not old or run_state.newest_state(store, cfg.run.id) is None:
        return
    old_key = Artifacts.from_json(old).tokenizer_key
    new_key = trained_tokenizer_key(cfg, files, store)
    if old_key != new_key:
        check_resume(cfg, cfg.run.id, {"tokenizer": f"a new tokenizer ({new_key}) for the changed corpus or "
                                                    f"tokenizer settings"})


def stopped_before_training(what: str):
    """The line a signal logs before the training processes start (the lease's wait, pulling the model,
    prepare, packing: downloads and encodes). From there launch passes signals to the workers, which
    checkpoint; before, `pretrain` and `sft` alone exit 75 at once and release the lease, as `run` does
    between stages (the lease would otherwise hold the run for run.lease_seconds)."""
    return lambda signum: (f"{what}: received signal {signum} before training: exiting with {EXIT_PREEMPTED} "
                           f"(rerun to continue; finished stages are reused)")


def stage_pretrain(cfg: Config, arts: Artifacts | None = None, lease=None) -> int:
    """Train to train.max_steps (resuming from the newest complete checkpoint of run.id); returns 0,
    75 (preempted: rerun to resume) or the failure code. Holds the run's lease on node 0 unless the
    caller (`run`) already does."""
    done = run_state.newest_state(bucket(cfg), cfg.run.id)
    target = run_state.run_steps(cfg.train.max_steps, cfg.train.budget_minutes, done)
    if run_state.finished(done, target):
        log(f"pretrain: {protocol.step_name(done.step)} is published (" + (
            f"train.max_steps={target}" if not cfg.train.budget_minutes else
            f"the {target} steps train.budget_minutes={cfg.train.budget_minutes:g} gave") + "); nothing to train")
        return 0
    if lease is None and node_rank() == 0:  # `pretrain` alone: check and hold the lease here
        check_before_start(cfg)
        restore = stop_on_signals(stopped_before_training("pretrain"))
        try:
            lease = hold_lease(cfg)
            try:
                return stage_pretrain(cfg, arts, lease)
            finally:
                lease.release()
        finally:
            restore()
    if arts is None:
        files = stage_pull(cfg)
        check_tokenizer_kept(cfg, files)
        arts = prepare_inputs(cfg, files)
    store = bucket(cfg)
    indexes = [json.loads(store.read_text(join(k, "index.json"))) for k in arts.keys]
    index = indexes[0]
    # A corpus too small for one sequence is exit 2 here, with its counts, not a crash in the workers.
    mixture.check_trainable(cfg, indexes)
    tok_dir = fetch_folder(store, arts.tokenizer_key, Path(cfg.storage.local_dir))
    init = init_model(cfg, index["vocab_size"])
    check_resume(cfg, cfg.run.id, pretrain_inputs(cfg, tokenizer_fingerprint(tok_dir),
                                                  mixture.data_name(cfg.data, arts.keys), index["vocab_size"], init))
    run_local = Path(cfg.storage.local_dir) / "runs" / cfg.run.id
    run_local.mkdir(parents=True, exist_ok=True)
    cfg_path, arts_path, init_path = run_local / "resolved.yaml", run_local / "artifacts.json", run_local / "init.json"
    cfg_path.write_text(to_yaml(cfg), encoding="utf-8")
    arts_path.write_text(arts.to_json())
    if init:
        init_path.write_text(json.dumps(init))
    if node_rank() == 0:
        store.write_text(f"runs/{cfg.run.id}/config.yaml", to_yaml(cfg))
        store.write_text(f"runs/{cfg.run.id}/artifacts.json", arts.to_json())  # for the report
    nproc, nnodes = nproc_nnodes(cfg)
    return launch("pretrain", store, cfg.run.id, run_local, nproc, nnodes,
                  ["--stage=pretrain", f"--config={cfg_path}", f"--artifacts={arts_path}"]
                  + ([f"--init={init_path}"] if init else []),
                  lambda: pretrain_worker(cfg, arts, lease, init), lease, cfg.train.grace_seconds)


# Stage 5: export -------------------------------------------------------------------------------

def final_key(cfg: Config) -> str:
    return f"runs/{cfg.run.id}/final"


def export_card(store: Storage, run_id: str, stage: str = "pretrain"):
    """card(checkpoint folder) -> the export's README.md (trainer/model/model_card.py), from the
    checkpoint's config.yaml, trainer_state.json and config.json, the run's metrics and (pretraining)
    the shards' index.json in the bucket."""
    import yaml

    from trainer.evaluation.report import parse_metrics
    from trainer.model.model_card import model_card

    def card(src: Path) -> str:
        arts = store.read_text_or_none(f"runs/{run_id}/artifacts.json")
        key = Artifacts.from_json(arts).data_key if arts else ""  # "" for a mixture: the card lists its shares
        index = store.read_text_or_none(join(key, "index.json")) if key else None
        rows, _ = parse_metrics(store.read_text_or_none(f"runs/{run_id}/metrics.jsonl") or "")
        return model_card(run_id, yaml.safe_load((src / "config.yaml").read_text(encoding="utf-8")) or {},
                          json.loads((src / "trainer_state.json").read_text(encoding="utf-8")),
                          json.loads((src / "config.json").read_text(encoding="utf-8")),
                          json.loads(index) if index and stage == "pretrain" else None, rows, stage)
    return card


def stage_export(cfg: Config) -> str:
    """The newest checkpoint's Hugging Face files at runs/<id>/final/ with a model card (README.md),
    manifest last."""
    check_scratch_apart(cfg.storage)  # a bucket inside local_dir: export would delete its own staged folder
    store, key = bucket(cfg), final_key(cfg)
    step = ckpt.export(store, cfg.run.id, key, Path(cfg.storage.local_dir), card=export_card(store, cfg.run.id))
    log(f"export: {store.url(key)} is up to date" if step is None else f"export: step {step} -> {store.url(key)}")
    return key


# Stage 6: report -------------------------------------------------------------------------------

def stage_report(cfg: Config, files=None) -> str:
    """runs/<id>/report/: report.md with plots of the logged metrics, an evaluation of the export
    (held-out bits per character, samples, degeneration metrics beside the human text's), the
    samples taken at checkpoints, and TensorBoard event files. Rewritten on every call; the
    evaluation is reused while the export it judged is still the newest, and the benchmark scores
    `eval --tasks` wrote there (lm_eval.json) are kept."""
    store = bucket(cfg)
    key = f"runs/{cfg.run.id}/report"
    out = Path(cfg.storage.local_dir) / key
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # The step count the run trained to: fixed by train.budget_minutes or capped by train.max_epochs.
    done = run_state.newest_state(store, cfg.run.id)
    steps = run_state.run_steps(cfg.train.max_steps, cfg.train.budget_minutes, done) or cfg.train.max_steps
    trained = dataclasses.replace(cfg.train, max_steps=steps)
    summary = {"run": cfg.run.id, "model": f"continued from {cfg.model.init}" if cfg.model.init else
               model_label(cfg.model.preset, shape_overrides(cfg.model)),
               "optimizer": cfg.train.optimizer, "weight decay": cfg.train.weight_decay,
               "schedule": cfg.train.schedule, "lr": cfg.train.lr, "steps": steps,
               "batch tokens": cfg.train.batch_tokens, "seq len": cfg.train.seq_len}
    arts = store.read_text_or_none(f"runs/{cfg.run.id}/artifacts.json")
    # What the corpus filters removed, which bad records data.on_error=skip skipped, a mixture's tokens per source.
    indexes = [json.loads(t) for t in (store.read_text_or_none(join(k, "index.json")) for k in
                                       (Artifacts.from_json(arts).keys if arts else ())) if t]
    summary.update(mixture.corpus_summary(cfg, indexes, done.data_position if done else 0))
    ev = None
    export = store.read_text_or_none(join(final_key(cfg), protocol.MANIFEST))
    if export:
        export_step = json.loads(export)["step"]
        old = store.read_text_or_none(join(key, "eval.json"))
        ev = json.loads(old) if old else None
        if not ev or ev.get("export_step") != export_step:
            model, tok = load_for_generation(store.url(final_key(cfg)), cfg)
            s = cfg.sample
            files = files if files is not None else stage_pull(cfg)
            # S3 files are copied one at a time, only as far into the corpus as the held-out set needs
            docs = heldout_documents(cfg, PulledOnDemand(cfg, files), s.eval_chars, s.heldout_prompts)
            ev = {"export_step": export_step, **evaluate_model(model, tok, cfg, docs)}
        (out / "eval.json").write_text(json.dumps(ev, ensure_ascii=False, indent=1), encoding="utf-8")
    from trainer.evaluation.harness import RESULTS_FILE

    tasks = store.read_text_or_none(join(key, RESULTS_FILE))  # `eval --tasks` wrote it: kept, shown in report.md
    if tasks:
        (out / RESULTS_FILE).write_text(tasks, encoding="utf-8")
    write_run_report(out, store.read_text_or_none(f"runs/{cfg.run.id}/metrics.jsonl") or "", summary, ev,
                     store.read_text_or_none(f"runs/{cfg.run.id}/samples.jsonl") or "", train_cfg=trained)
    store.delete_prefix(key + "/")
    store.upload_dir(out, key)
    log(f"report: {store.url(join(key, 'report.md'))}")
    if ev and ev.get("samples"):
        log("samples from the exported model:")
        for x in ev["samples"]:
            print(f"--- {x['prompt']}\n{x['prompt']}{x['text']}\n", flush=True)
    return key


# SFT ---------------------------------------------------------------------------------------------

def sft_init_url(cfg: Config) -> str:
    return cfg.sft.init or bucket(cfg).url(f"runs/{cfg.run.id}/final")


def stage_sft(cfg: Config) -> int:
    """The SFT job: starting model, packed conversations, training (the one loop; torchrun when more
    than one process), export to runs/<sft run>/final. Node 0 holds the SFT run's lease. Returns the
    exit code (0 done, 75 preempted: rerun to resume)."""
    store, run_id = bucket(cfg), sft_run_id(cfg)
    nproc, nnodes = nproc_nnodes(cfg)
    try:
        batch_geometry(cfg.sft.batch_sequences, nproc * nnodes, cfg.train.micro_batch_size, "sft.batch_sequences")
    except ValueError as e:
        raise ConfigError(f"invalid configuration:\n  {e}") from None
    done = run_state.newest_state(store, run_id)
    if run_state.finished(done, run_state.run_steps(cfg.sft.max_steps, 0.0, done)):
        log(f"sft: {protocol.step_name(done.step)} of {run_id} is published (sft.max_steps={cfg.sft.max_steps}); "
            f"nothing to train")
    else:
        restore = stop_on_signals(stopped_before_training("sft"))
        try:
            lease = hold_lease(cfg, run_id)
            try:
                code = _train_sft(cfg, store, run_id, nproc, nnodes, lease)
            finally:
                if lease is not None:
                    lease.release()
        finally:
            restore()
        if code:
            log(f"sft exited with {code}"
                + (" (preempted: rerun the same command to resume)" if code == EXIT_PREEMPTED else ""))
            return code
    if node_rank() == 0:
        key = f"runs/{run_id}/final"
        step = ckpt.export(store, run_id, key, Path(cfg.storage.local_dir), "sft export",
                           card=export_card(store, run_id, "sft"))
        log(f"sft export: {store.url(key)} is up to date" if step is None else
            f"sft export: step {step} -> {store.url(key)}")
        log(f"sft done. model: {store.url(key)}  chat: python entrypoint.py chat --checkpoint {store.url(key)}")
    return 0


def _train_sft(cfg: Config, store: Storage, run_id: str, nproc: int, nnodes: int, lease) -> int:
    from transformers import AutoConfig

    init = sft_init_url(cfg)
    log(f"sft: {init} -> {store.url(f'runs/{run_id}')}")
    try:
        init_dir = ckpt.model_dir(init, cfg.storage, Path(cfg.storage.local_dir))
    except FileNotFoundError as e:
        raise ConfigError(f"sft.init: {e}") from None
    tok = load_chat_tokenizer(init_dir)
    context = AutoConfig.from_pretrained(str(init_dir)).max_position_embeddings
    seq_len = cfg.sft.seq_len or context
    if seq_len > context:
        log(f"sft: sft.seq_len={seq_len} is longer than the model's context ({context} tokens): positions beyond it "
            f"were never pretrained (here only conversations that long train them) and RoPE extrapolates poorly; "
            f"the export's context becomes {seq_len}")
    data_dir = prepare_conversations(cfg, tok, seq_len)
    check_resume(cfg, run_id, sft_inputs(seq_len, data_dir.name))
    run_local = Path(cfg.storage.local_dir) / "runs" / run_id
    run_local.mkdir(parents=True, exist_ok=True)
    cfg_path = run_local / "resolved.yaml"
    cfg_path.write_text(to_yaml(cfg), encoding="utf-8")
    if node_rank() == 0:
        store.write_text(f"runs/{run_id}/config.yaml", to_yaml(cfg))
    return launch("sft", store, run_id, run_local, nproc, nnodes,
                  ["--stage=sft", f"--config={cfg_path}", f"--data={data_dir}", f"--init={init_dir}"],
                  lambda: sft_worker(cfg, data_dir, init_dir, lease), lease, cfg.train.grace_seconds)
