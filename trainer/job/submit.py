"""Render how to launch a config somewhere else: a `docker run` command, a SkyPilot task, a Kubernetes manifest.

    python entrypoint.py submit docker   --config configs/my.yaml            # one GPU host
    python entrypoint.py submit skypilot --config configs/my.yaml --nodes 2  # managed (spot) job
    python entrypoint.py submit k8s      --config configs/my.yaml --nodes 4  # indexed Job

Every target runs the same image the same way: `python /app/entrypoint.py run` with the environment
contract of docs/design.md (RUN_ID, BUCKET, AWS_ENDPOINT_URL, ..., and NNODES / NODE_RANK / MASTER_ADDR /
MASTER_PORT / NPROC for several nodes). The hand-written files under infra/ are the same recipes with
comments; tests/test_infra.py checks that both wire the contract.

Credentials are only ever named (`-e AWS_SECRET_ACCESS_KEY`, SkyPilot `secrets:`, a Kubernetes Secret),
never written: `render` refuses to return text that contains the value of one from the environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import yaml

from trainer.config import ENV_KEYS, Config, load_config, to_dict, to_yaml
from trainer.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

TARGETS = ("docker", "skypilot", "k8s")
DEFAULT_IMAGE = "zh-pretrain:latest"  # `docker build -t zh-pretrain:latest .`; push it somewhere for clouds
DEFAULT_GPUS_PER_NODE = 8  # skypilot / k8s when gpus_per_node is 0 (docker then takes all of the host's)
MASTER_PORT = 29500  # torchrun's default rendezvous port
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # passed by name only
SECRET_VALUES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # whose values must never appear in the output
K8S_SECRET = "zh-pretrain-s3"  # kubectl create secret generic zh-pretrain-s3 --from-literal=...
SCRATCH_VOLUME = "zh-pretrain-scratch"  # docker named volume: keeps the pulled corpus and shards across restarts
# SkyPilot: retry crashes a few times; exit 75 (preempted after a checkpoint) always. Exit 2 is retried
# too (SkyPilot has no "never retry" list), one reason `render` takes a Config that load_config validated.
SKYPILOT_RECOVERY = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 3,
                     "recover_on_exit_codes": [EXIT_PREEMPTED]}


def render(target: str, cfg: Config, config_path: str | None, nodes: int = 1, gpus_per_node: int = 0,
           image: str = DEFAULT_IMAGE, accelerator: str = "H100") -> str:
    """The command (docker) or file (skypilot, k8s) that runs `cfg` on `nodes` machines.

    gpus_per_node: GPUs each node gets; 0 = the target's default (docker: all GPUs of the host;
    skypilot, k8s: 8). accelerator: the SkyPilot GPU name. Raises ValueError naming what to change.
    """
    if target not in TARGETS:
        raise ValueError(f"submit: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if nodes < 1:
        raise ValueError(f"submit {target}: --nodes must be at least 1 (got {nodes})")
    if gpus_per_node < 0:
        raise ValueError(f"submit {target}: --gpus_per_node must be >= 0 (got {gpus_per_node})")
    if target != "docker" and not cfg.storage.bucket.startswith("s3://"):
        raise ValueError(f"submit {target}: storage.bucket must be s3://bucket/prefix (got {cfg.storage.bucket!r}); "
                         "a folder on a cloud node disappears with the node, checkpoints included")
    if target == "docker" and nodes > 1 and not cfg.storage.bucket.startswith("s3://"):
        raise ValueError(f"submit docker --nodes {nodes}: storage.bucket must be s3://bucket/prefix (got "
                         f"{cfg.storage.bucket!r}); a folder is one host's, the other nodes would never see it")
    if target == "docker":
        text = _docker(cfg, config_path, nodes, gpus_per_node, image)
    elif target == "skypilot":
        text = _skypilot(cfg, config_path, nodes, gpus_per_node or DEFAULT_GPUS_PER_NODE, image, accelerator)
    else:
        text = _k8s(cfg, config_path, nodes, gpus_per_node or DEFAULT_GPUS_PER_NODE, image)
    _refuse_secrets(text, target)
    return text


def run_env(cfg: Config) -> dict[str, str]:
    """The ENV_KEYS part of the contract for `cfg` (LOCAL_DIR is the image's /scratch, not the caller's)."""
    env = {"RUN_ID": cfg.run.id, "BUCKET": cfg.storage.bucket}
    if cfg.storage.endpoint_url:
        env["AWS_ENDPOINT_URL"] = cfg.storage.endpoint_url
    if cfg.storage.region:
        env["AWS_REGION"] = cfg.storage.region
    return env


def stop_seconds(cfg: Config) -> int:
    """How long a launcher waits after SIGTERM: the job's grace period plus time to upload and exit."""
    return stop_seconds_for(cfg.train.grace_seconds)


def stop_seconds_for(grace_seconds: int) -> int:
    return max(60, 2 * grace_seconds + 10)


def _refuse_secrets(text: str, target: str) -> None:
    for name in SECRET_VALUES:
        value = os.environ.get(name, "")
        if len(value) >= 8 and value in text:
            raise ValueError(f"submit {target}: the output would contain the value of {name}; credentials must "
                             "stay out of configs and commands (boto3 reads them from the environment)")


def cli_overrides(cfg: Config, config_path: str | None) -> list[str]:
    """`--section.key=value` for every key where `cfg` differs from the file alone (env-set keys excluded)."""
    base = to_dict(load_config(config_path or None, env={}))
    from_env = set(ENV_KEYS.values())
    out = []
    for section, values in to_dict(cfg).items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if key in from_env or base[section][name] == value:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, list):
                value = json.dumps(value, ensure_ascii=False)
            out.append(f"--{key}={value}")
    return out


# docker ----------------------------------------------------------------------------------------

def _docker(cfg: Config, config_path: str | None, nodes: int, gpus_per_node: int, image: str) -> str:
    env = run_env(cfg)
    volumes = [f"{SCRATCH_VOLUME}:/scratch"]
    if not cfg.storage.bucket.startswith("s3://"):  # a host folder as the bucket: mount it
        host = Path(cfg.storage.bucket).expanduser().resolve()
        volumes.append(f"{host}:/bucket")
        env["BUCKET"] = "/bucket"
    if config_path:
        host = Path(config_path).expanduser().resolve()
        volumes.append(f"{host}:/config/{host.name}:ro")
        env = {"CONFIG": f"/config/{host.name}", **env}
    endpoint_host = re.sub(r"^\w+://([^/:]+).*$", r"\1", cfg.storage.endpoint_url)
    # Several nodes (NCCL between hosts) or an S3 endpoint on this host's loopback need the host network.
    host_net = nodes > 1 or endpoint_host in ("localhost", "127.0.0.1")
    head = ["docker", "run", "--rm", f"--name=zh-pretrain-{cfg.run.id}",
            "--gpus=all" if gpus_per_node == 0 else f"--gpus={gpus_per_node}",
            "--ipc=host", "--ulimit=memlock=-1", "--ulimit=stack=67108864", f"--stop-timeout={stop_seconds(cfg)}"]
    if host_net:
        head.append("--network=host")
    groups = [head, *[["-v", v] for v in volumes], *[["-e", f"{k}={v}"] for k, v in env.items()],
              [a for name in SECRET_ENV for a in ("-e", name)]]  # `-e NAME`: copied from this shell
    comment = []
    if nodes > 1:
        groups.append(["-e", f"NNODES={nodes}", "-e", "NODE_RANK", "-e", "MASTER_ADDR",
                       "-e", f"MASTER_PORT={MASTER_PORT}"])
        comment = [f"# {nodes} nodes: run this on every node, with NODE_RANK=0..{nodes - 1} and MASTER_ADDR=<node 0's",
                   "# address> exported there; node 0 must accept TCP on MASTER_PORT from the others."]
    mounts, sources = local_sources(cfg)
    groups[1:1] = [["-v", v] for v in mounts]
    overrides = [o for o in cli_overrides(cfg, config_path) if not o.startswith(tuple(f"--{k}=" for k in sources))]
    overrides += [f"--{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sources.items()]
    groups.append([image, "run", *overrides])
    lines = [" ".join(shlex.quote(a) for a in g) for g in groups]
    prepare = []
    if not cfg.storage.bucket.startswith("s3://"):
        # The image runs as uid 1000, which cannot write a folder Docker creates for a missing mount source
        # (root's) or one this user owns under another uid. So the folder is made here first, and the job
        # runs as this shell's user, in group 0 for the image's /app, /scratch and $HOME (group 0 has the
        # owner's rights there): the checkpoints are then this user's files on the host.
        host = shlex.quote(str(Path(cfg.storage.bucket).expanduser().resolve()))
        prepare = [f"mkdir -p {host}"]
        lines.insert(1, '--user="$(id -u):$(id -g)" --group-add=0')
    body = " \\\n  ".join(lines)
    return "\n".join([*comment, "# AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY come from this shell's environment.",
                      *prepare, body]) + "\n"


BUNDLED = (["data", "sample"], ["data", "sft-sample"])  # the Dockerfile copies these samples into the image


def local_sources(cfg: Config) -> tuple[list[str], dict[str, list[str]]]:
    """(read-only volume specs, {config key: sources as the container sees them}) for the local
    paths in data.sources and sft.sources: each one's folder (the part before any glob character)
    is mounted at /data/<n>, so the container reads the files the config names on this host.
    s3:// sources pass through unchanged."""
    mounts: dict[Path, str] = {}
    out: dict[str, list[str]] = {}
    for key, sources in (("data.sources", cfg.data.sources), ("sft.sources", cfg.sft.sources)):
        mapped = []
        for src in sources:
            if src.startswith(("s3://", "hf://")) or src.split("/")[:2] in BUNDLED:
                mapped.append(src)  # in the bucket, or bundled in the image (/app/data/...)
                continue
            parts = Path(src).expanduser().parts
            # The folder to mount: up to the first glob part that is not a real name (as data.py reads it).
            cut = next((i for i, part in enumerate(parts)
                        if re.search(r"[*?[]", part) and not Path(*parts[:i + 1]).exists()), len(parts))
            base = Path(*parts[:cut]) if cut else Path(".")
            if cut == len(parts) and not base.is_dir():
                base = base.parent  # a file: mount its folder
            rest = parts[len(base.parts):]
            where = mounts.setdefault(base.resolve(), f"/data/{len(mounts)}")
            mapped.append(str(Path(where, *rest)))
        if mapped != list(sources):
            out[key] = mapped
    return [f"{host}:{where}:ro" for host, where in mounts.items()], out


# SkyPilot --------------------------------------------------------------------------------------

# The part of the run script that is the same in infra/skypilot/train.yaml. SkyPilot's default VM images
# ship Docker and the NVIDIA runtime, so the image runs as built (tini, user `trainer`); --network host
# lets NCCL and the rendezvous use the node addresses SkyPilot hands out.
SKYPILOT_LAUNCH = """\
# torchrun wiring for `run` (docs/design.md): node 0 of SKYPILOT_NODE_IPS hosts the rendezvous.
export NNODES="$SKYPILOT_NUM_NODES"
export NODE_RANK="$SKYPILOT_NODE_RANK"
export MASTER_ADDR="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"
export MASTER_PORT="${MASTER_PORT:-29500}"
export NPROC="$SKYPILOT_NUM_GPUS_PER_NODE"
# A managed job keeps SKYPILOT_TASK_ID across recoveries, so it names the run when RUN_ID is unset.
export RUN_ID="${RUN_ID:-$(printf '%s' "$SKYPILOT_TASK_ID" | tr -c 'A-Za-z0-9._-' '-')}"
docker run --rm --gpus all --network host --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \\
  --stop-timeout "${STOP_SECONDS:-60}" -v zh-pretrain-scratch:/scratch -v "$HOME/zh-pretrain/train.yaml:/config/train.yaml:ro" \\
  -e CONFIG=/config/train.yaml -e RUN_ID -e BUCKET -e AWS_ENDPOINT_URL -e AWS_REGION \\
  -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \\
  -e NNODES -e NODE_RANK -e MASTER_ADDR -e MASTER_PORT -e NPROC \\
  "$IMAGE" run
"""


def _skypilot(cfg: Config, config_path: str | None, nodes: int, gpus: int, image: str, accelerator: str) -> str:
    config_yaml = to_yaml(cfg)
    run = ("set -euo pipefail\n"
           "# the resolved config, embedded so the task needs no local files\n"
           "mkdir -p \"$HOME/zh-pretrain\"\n"
           "cat > \"$HOME/zh-pretrain/train.yaml\" <<'ZH_PRETRAIN_CONFIG'\n"
           f"{config_yaml}"
           "ZH_PRETRAIN_CONFIG\n" + SKYPILOT_LAUNCH)
    task = {
        "name": f"zh-pretrain-{cfg.run.id}",
        "num_nodes": nodes,
        "resources": {"accelerators": f"{accelerator}:{gpus}", "use_spot": True, "disk_size": 256,
                      "job_recovery": dict(SKYPILOT_RECOVERY)},
        "envs": {"IMAGE": image, **run_env(cfg), "MASTER_PORT": str(MASTER_PORT),
                 "STOP_SECONDS": str(stop_seconds(cfg))},
        "secrets": {name: None for name in SECRET_ENV},
        "setup": 'docker pull "$IMAGE"\n',
        "run": run,
    }
    header = [f"# SkyPilot managed job for run {cfg.run.id!r} (from {config_path or 'defaults'}), written by",
              "# `entrypoint.py submit skypilot`. Launch with the keys in your shell:",
              f"#   sky jobs launch -n zh-pretrain-{cfg.run.id} --secret AWS_ACCESS_KEY_ID "
              "--secret AWS_SECRET_ACCESS_KEY <this file>"]
    return "\n".join(header) + "\n" + _dump([task])


# Kubernetes ------------------------------------------------------------------------------------

def k8s_name(run_id: str) -> str:
    """A DNS-1123 name for the run's Job and Service, short enough for `<name>-<index>` pod hostnames."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "run"
    return f"zh-pretrain-{slug}"[:50].rstrip("-")


def k8s_manifests(name: str, nodes: int, gpus: int, image: str, env: dict[str, str], config_map: str,
                  grace_seconds: int) -> list[dict]:
    """Headless Service + indexed Job: pod i is node i; `<name>-0.<name>` is node 0 for the rendezvous."""
    labels = {"app.kubernetes.io/name": "zh-pretrain", "zh-pretrain/job": name}
    contract = [{"name": "CONFIG", "value": "/config/train.yaml"}, {"name": "LOCAL_DIR", "value": "/scratch"}]
    contract += [{"name": k, "value": v} for k, v in env.items()]
    contract += [{"name": s, "valueFrom": {"secretKeyRef": {"name": K8S_SECRET, "key": s}}} for s in SECRET_ENV]
    contract += [{"name": "NPROC", "value": str(gpus)}]
    if nodes > 1:
        contract += [
            {"name": "NNODES", "value": str(nodes)},
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},
            {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        ]
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"zh-pretrain/job": name},
                 "ports": [{"name": "rendezvous", "port": MASTER_PORT}]},
    }
    container = {
        "name": "trainer", "image": image, "args": ["run"], "env": contract,
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}],
        "resources": {"limits": {"nvidia.com/gpu": gpus}},
        "volumeMounts": [{"name": "config", "mountPath": "/config", "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "scratch", "mountPath": "/scratch"}],
    }
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
            "backoffLimit": 6,  # crashes (exit 1) across all pods before the Job fails
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                      "values": [EXIT_BAD_INPUT]}},
                {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                     "values": [EXIT_PREEMPTED]}},
                # `status` is required by the Job API's OpenAPI schema (PodFailurePolicyOnPodConditionsPattern:
                # type and status), though the server defaults it to "True": strict validators refuse it absent.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "subdomain": name, "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": stop_seconds_for(grace_seconds),
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": config_map}},
                                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                                {"name": "scratch", "emptyDir": {}}],
                },
            },
        },
    }
    return [service, job]


def _k8s(cfg: Config, config_path: str | None, nodes: int, gpus: int, image: str) -> str:
    name = k8s_name(cfg.run.id)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-config", "labels": {"app.kubernetes.io/name": "zh-pretrain"}},
                  "data": {"train.yaml": to_yaml(cfg)}}
    docs = [config_map, *k8s_manifests(name, nodes, gpus, image, run_env(cfg), f"{name}-config",
                                       cfg.train.grace_seconds)]
    header = [f"# Kubernetes: run {cfg.run.id!r} (from {config_path or 'defaults'}) on {nodes} node(s) x {gpus} GPU(s),",
              "# written by `entrypoint.py submit k8s`. Once per namespace, the S3 keys from your shell:",
              f"#   kubectl create secret generic {K8S_SECRET} --from-literal=AWS_ACCESS_KEY_ID=\"$AWS_ACCESS_KEY_ID\" \\",
              "#     --from-literal=AWS_SECRET_ACCESS_KEY=\"$AWS_SECRET_ACCESS_KEY\"",
              "# then: kubectl apply -f <this file>"]
    return "\n".join(header) + "\n" + _dump(docs)


# YAML output -----------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Multi-line strings (scripts, the embedded config) as readable `|` blocks; no &anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120,
                         explicit_start=len(docs) > 1)
