"""FSDP2 (train.strategy=fsdp) on CPU over gloo: the same loop with another wrapper.

One uninterrupted 2-process FSDP reference run, then the same config under other run ids:
  * its checkpoints are DCP shards of both ranks, listed with their sha256 in the manifest;
  * kill -9 after a checkpoint, rerun on 2 processes: bitwise equal to the reference;
  * preempted on 2 processes, resumed on 1 (unsharded, from the DCP shards): equal within fp32
    reduction noise (rel 1e-4), and a 1-process (Hugging Face) checkpoint resumed on 2 FSDP processes;
  * FSDP's numbers match DDP's for the same global batch (rel 1e-4);
  * two nodes (separate local disks, one bucket): each uploads its own shards, the manifest comes last;
    resumed on two nodes, each fetches only the shard files its ranks read (issue 21);
  * export consolidates the shards into the same Hugging Face folder a DDP run exports.
The validation set (eval_sequences=6, micro-batch 2: 3 batches over 2 ranks) is uneven on purpose:
FSDP ranks must run as many forward passes, or the run hangs.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from faults import assert_same
from trainer.config import replace
from trainer.io.storage import open_storage
from trainer.parallel import fsdp as sharding
from trainer.state import protocol

pytestmark = pytest.mark.slow

N = 16  # steps of every run
K = 8  # the stop after checkpoint K
COMPARED = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens")
TWO = {"train.nproc": 2}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("fsdp")
    return tiny_config(root, {"train.max_steps": N, "train.warmup_steps": 4, "train.strategy": "fsdp",
                              "train.eval_sequences": 6, "checkpoint.upload_async": True})


def run_config(base, run_id: str, **overrides):
    return replace(base, **{"run.id": run_id, **overrides})


def weights_of(store, run_id: str, step: int, scratch: Path) -> dict:
    """The weights of a complete checkpoint (either format), by name."""
    from safetensors.torch import load_file

    src = protocol.fetch_verified(store, run_id, step, scratch / f"{run_id}-{step}")
    if (src / sharding.DCP_METADATA).is_file():
        return load_file(str(sharding.consolidated_weights(src, scratch / f"{run_id}-{step}-hf")))
    return load_file(str(src / "model.safetensors"))


def outcome(cfg, metrics, scratch: Path) -> tuple[list[dict], dict]:
    store = open_storage(cfg.storage.bucket)
    rows = [{k: r[k] for k in COMPARED if k in r} for r in metrics(store, cfg.run.id)]
    return rows, weights_of(store, cfg.run.id, protocol.complete_steps(store, cfg.run.id)[0], scratch)


@pytest.fixture(scope="module")
def reference(base, metrics, cli, tmp_path_factory):
    """N steps on 2 FSDP processes, uninterrupted."""
    scratch = tmp_path_factory.mktemp("fsdp-ref")
    cfg = run_config(base, "straight")
    done = cli.run("pretrain", cli.write_config(cfg, scratch / "straight.yaml"), TWO)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "on 2 x cpu (fsdp)" in done.stdout
    rows, weights = outcome(cfg, metrics, scratch)
    assert [r["step"] for r in rows] == list(range(1, N + 1))
    assert [r["step"] for r in rows if "val_loss" in r] == list(range(4, N + 1, 4))
    return rows, weights


def test_a_sharded_checkpoint_holds_every_ranks_shards_in_its_manifest(base, reference, tmp_path):
    store = open_storage(base.storage.bucket)
    prefix = f"{protocol.checkpoints_prefix('straight')}/{protocol.step_name(N)}"
    manifest = json.loads(store.read_text(f"{prefix}/{protocol.MANIFEST}"))
    names = set(manifest["files"])
    assert {"__0_0.distcp", "__1_0.distcp", sharding.DCP_METADATA, "trainer_state.json", "rng.pt",
            "config.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names and "optimizer.pt" not in names
    assert all(len(m["sha256"]) == 64 for m in manifest["files"].values())
    assert json.loads(store.read_text(f"{prefix}/config.json"))["architectures"] == ["LlamaForCausalLM"]
    # The manifest is checked: a flipped byte in a shard is caught on download.
    shard = Path(base.storage.bucket) / prefix / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    try:
        with pytest.raises(protocol.StorageError, match="sha256"):
            protocol.fetch_verified(store, "straight", N, tmp_path / "check")
    finally:
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))


def test_kill_9_then_rerun_on_two_processes_is_exact(base, reference, metrics, cli, tmp_path):
    cfg = run_config(base, "killed")
    store = open_storage(cfg.storage.bucket)
    path = cli.write_config(cfg, tmp_path / "killed.yaml")
    killed_at = cli.kill_after_a_checkpoint(path, TWO, tmp_path / "killed.log", store, "killed")
    assert killed_at and killed_at[0] < N, f"the run finished before the kill: {killed_at}"
    again = cli.run("pretrain", path, {**TWO, "run.takeover": "true"})
    assert again.returncode == 0, again.stdout[-6000:]
    assert f"resumed from {protocol.step_name(killed_at[0])} (saved by 2 process(es), now 2)" in again.stdout
    assert_same(outcome(cfg, metrics, tmp_path), reference, exact=True)


def preempt_at_k(cli, cfg, tmp_path: Path, overrides: dict):
    env = cli.sigterm_after_checkpoint_env(K, tmp_path)
    out = cli.run("pretrain", cli.write_config(cfg, tmp_path / f"{cfg.run.id}.yaml"), overrides, env=env)
    assert out.returncode == 75, out.stdout[-6000:]
    assert f"stopped at step {K}" in out.stdout
    return out


@pytest.mark.parametrize("strategy", ["auto", "fsdp"])
def test_preempted_on_two_fsdp_processes_resumed_on_one(base, reference, metrics, cli, tmp_path, single_process,
                                                         caplog, strategy):
    """auto: the DCP shards load into an unsharded model; fsdp: into FSDP over one process (a
    process group of one, made in this process)."""
    from trainer.job.stages import stage_prepare
    from trainer.training.worker import pretrain_worker

    cfg = run_config(base, f"shrunk-{strategy}", **{"checkpoint.upload_async": False})
    preempt_at_k(cli, cfg, tmp_path, TWO)
    caplog.clear()
    one = replace(cfg, **{"train.strategy": strategy})
    assert pretrain_worker(one, stage_prepare(one))["step"] == N
    assert f"resumed from step-{K:08d} (saved by 2 process(es), now 1)" in caplog.text
    assert f"on 1 x cpu ({'ddp' if strategy == 'auto' else 'fsdp'})" in caplog.text
    assert_same(outcome(cfg, metrics, tmp_path), reference, exact=False)


def test_a_one_process_checkpoint_resumes_on_two_fsdp_processes(base, reference, metrics, cli, tmp_path):
    cfg = run_config(base, "grown", **{"checkpoint.upload_async": False})
    preempt_at_k(cli, cfg, tmp_path, {"train.nproc": 1, "train.strategy": "auto"})
    path = tmp_path / "grown.yaml"
    store = open_storage(cfg.storage.bucket)
    folder = f"{protocol.checkpoints_prefix('grown')}/{protocol.step_name(K)}"
    files = json.loads(store.read_text(f"{folder}/{protocol.MANIFEST}"))
    assert "model.safetensors" in files["files"]  # one process: a Hugging Face checkpoint
    rest = cli.run("pretrain", path, TWO)
    assert rest.returncode == 0, rest.stdout[-6000:]
    assert "(saved by 1 process(es), now 2)" in rest.stdout and "(fsdp)" in rest.stdout
    assert_same(outcome(cfg, metrics, tmp_path), reference, exact=False)


def test_fsdp_matches_ddp_for_the_same_global_batch(base, reference, metrics, cli, tmp_path):
    cfg = run_config(base, "ddp", **{"train.strategy": "ddp"})
    done = cli.run("pretrain", cli.write_config(cfg, tmp_path / "ddp.yaml"), TWO)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "on 2 x cpu (ddp)" in done.stdout
    assert_same(outcome(cfg, metrics, tmp_path), reference, exact=False)


def run_on_two_nodes(cli, path: Path, tmp_path: Path, nproc: int) -> list[Path]:
    """pretrain on 2 nodes of nproc processes each on loopback, with separate local disks
    (tmp_path/disk<node>): each node reaches the bucket only through its own transfers. Returns the
    nodes' logs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        env = cli.env(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        disk = {"train.nproc": nproc, "storage.local_dir": str(tmp_path / f"disk{node}")}
        procs.append(cli.start("pretrain", path, disk, log=logs[-1], env=env))
    try:
        for p, log in zip(procs, logs):
            assert p.wait(timeout=300) == 0, log.read_text()[-6000:]
    finally:
        for p in procs:
            if p.poll() is None:
                cli.kill(p)
    return logs


def test_two_nodes_each_upload_their_shards_then_one_manifest(base, reference, metrics, cli, tmp_path):
    cfg = run_config(base, "nodes")
    logs = run_on_two_nodes(cli, cli.write_config(cfg, tmp_path / "nodes.yaml"), tmp_path, nproc=1)
    assert not list((tmp_path / "disk0").rglob("__1_0.distcp"))  # written on node 1 only
    assert "(fsdp)" in logs[0].read_text()
    assert_same(outcome(cfg, metrics, tmp_path), reference, exact=False)


def test_two_nodes_resume_fetching_only_their_ranks_shards(base, metrics, cli, tmp_path):
    """Issue 21: a checkpoint of 4 processes resumed on 2 nodes x 2. Each rank's load plan reads its
    own shards' file and rank 0's (which holds the entries every rank has, fsdp.save_dcp), so node
    1 (ranks 2, 3) fetches 3 of the 4 .distcp files and node 0 two, not every file each; the run
    equals an uninterrupted one on 4 processes bit for bit (so every weight and optimizer entry
    loaded is the one a full download gives)."""
    straight = run_config(base, "straight-4")
    done = cli.run("pretrain", cli.write_config(straight, tmp_path / "straight-4.yaml"), {"train.nproc": 4})
    assert done.returncode == 0, done.stdout[-6000:]
    cfg = run_config(base, "nodes-resume", **{"checkpoint.upload_async": False})
    preempt_at_k(cli, cfg, tmp_path, {"train.nproc": 4})
    store = open_storage(cfg.storage.bucket)
    listed = json.loads(store.read_text(f"{protocol.checkpoints_prefix(cfg.run.id)}/{protocol.step_name(K)}/"
                                        f"{protocol.MANIFEST}"))["files"]
    shards = {n: m["size"] for n, m in listed.items() if n.endswith(".distcp")}
    assert sorted(shards) == [f"__{r}_0.distcp" for r in range(4)]
    logs = run_on_two_nodes(cli, cli.write_config(cfg, tmp_path / "nodes-resume.yaml"), tmp_path, nproc=2)
    text = logs[0].read_text()
    assert f"resumed from {protocol.step_name(K)} (saved by 4 process(es), now 4)" in text

    def fetched(node: int) -> set[str]:  # the shard files on the node's own disk
        return {p.name for p in (tmp_path / f"disk{node}").rglob(f"resume*/{protocol.step_name(K)}/*.distcp")}

    assert fetched(0) == {"__0_0.distcp", "__1_0.distcp"}
    assert fetched(1) == {"__0_0.distcp", "__2_0.distcp", "__3_0.distcp"}  # a strict subset
    assert sum(shards[n] for n in fetched(1)) < sum(shards.values())
    assert "the node of rank(s) 2-3 fetched 3 of 4 shard files" in text
    assert_same(outcome(cfg, metrics, tmp_path), outcome(straight, metrics, tmp_path), exact=True)


def test_export_consolidates_the_shards_into_a_hugging_face_folder(base, reference, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = run_config(base, "straight")
    out = cli.run("export", cli.write_config(cfg, tmp_path / "export.yaml"))
    assert out.returncode == 0, out.stdout[-6000:]
    final = Path(cfg.storage.bucket) / "runs" / "straight" / "final"
    names = {p.name for p in final.iterdir()}
    assert "model.safetensors" in names and not [n for n in names if sharding.is_dcp_file(n)]
    assert not names & set(protocol.TRAINING_FILES) - {protocol.MANIFEST}
    model = AutoModelForCausalLM.from_pretrained(str(final))
    for name, tensor in model.state_dict().items():
        if name in reference[1]:
            assert torch.equal(tensor, reference[1][name]), name


def test_strategy_auto_shards_from_two_billion_parameters_and_never_one_process():
    assert sharding.resolve_strategy("auto", 1_900_000_000, 8) == "ddp"
    from trainer.model.llama import FSDP_AUTO_PARAMS
    assert sharding.resolve_strategy("auto", FSDP_AUTO_PARAMS, 8) == "fsdp"
    assert sharding.resolve_strategy("fsdp", 1000, 2) == "fsdp"
    assert sharding.resolve_strategy("ddp", 7_000_000_000, 8) == "ddp"
    assert sharding.resolve_strategy("auto", 7_000_000_000, 1) == "ddp"  # nothing to shard over
    assert sharding.resolve_strategy("fsdp", 1000, 1) == "fsdp"  # asked for: the same path as on many GPUs


MATERIALIZE = r'''
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from trainer.model.llama import build_model, llama_config
from trainer.parallel.fsdp import materialize, shard

dist.init_process_group("gloo")
rank, tie = dist.get_rank(), sys.argv[2] == "tied"
config = llama_config("tiny", 256, 32, tie)
with torch.device("meta"):
    model = build_model(config, "sdpa")
shard(model, bf16=False)
calls = []

def full():
    calls.append(rank)
    torch.manual_seed(7)
    return build_model(config, "sdpa")

materialize(model, full, torch.device("cpu"))
local = sum(p.to_local().numel() for p in model.parameters())
gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
torch.manual_seed(7)
ref = build_model(config, "sdpa")
out = {"calls": calls, "local": local, "total": sum(p.numel() for p in ref.parameters()),
       "tied": model.lm_head.weight is model.model.embed_tokens.weight,
       "equal": sorted(k for k, v in ref.state_dict().items() if k in gathered and torch.equal(v, gathered[k])),
       "keys": sorted(ref.state_dict()),
       "inv_freq": torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
'''


@pytest.mark.parametrize("tie", ["tied", "untied"])
def test_sharded_starting_weights_come_from_rank_0_alone(tie, tmp_path):
    """The FSDP path builds the model on the meta device, shards it, then rank 0 alone builds the
    starting weights (on CPU) and broadcasts them: every rank ends with its half, equal to the
    unsharded initialisation with the same seed, RoPE buffers set and tied weights still tied."""
    import subprocess
    import sys

    script = tmp_path / "materialize.py"
    script.write_text(MATERIALIZE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path), tie], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["calls"] for r in ranks] == [[0], []]  # only rank 0 ever held the whole model
    for r in ranks:
        assert r["equal"] == r["keys"]  # every weight equals the unsharded init, bit for bit
        assert r["inv_freq"] and r["tied"] == (tie == "tied")
        assert r["local"] < 0.6 * r["total"]  # each rank holds about half
