"""Bad input at the command line is a one-line error and exit 2, never a traceback: empty prompts
(in sample.prompts and `generate --prompt`), a `--checkpoint` with no model behind it (generate,
eval, chat; local folders, bucket checkpoints, s3://), `plan --out` onto an existing file. Ctrl-C in
`chat` exits 130 quietly. `generate` takes `--seed` and every checkpoint form eval and chat take."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import entrypoint
from faults import chat_model  # noqa: F401 - fixture
from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_ENV = ("CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR", "AWS_ENDPOINT_URL", "AWS_REGION")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in CONFIG_ENV:  # in-process CLI calls read these over the defaults
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_DIR", str(tmp_path / "work"))  # downloads and caches stay in the test's folder


@pytest.fixture(scope="session")
def model_folder(chat_model):
    """A Hugging Face folder as an export holds it (faults.chat_model: our tokenizer with the chat
    template and a random tiny Llama)."""
    return chat_model


def exits_2(capsys, *args: str) -> str:
    """Run the CLI in-process, expect exit 2 with nothing on stdout; the one-line error."""
    with pytest.raises(SystemExit) as e:
        entrypoint.main(list(args))
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def entrypoint_process(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV}
    return subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


# Prompts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, bad", [
    (["床前明月光", ""], [1]),
    (["   "], [0]),
    (["\n", "春", "\t \u3000"], [0, 2]),  # U+3000, the ideographic space, is whitespace too
    ([""], [0]),
])
def test_empty_sample_prompts_are_a_config_error_naming_each(prompts, bad):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"sample.prompts": prompts}, env={})
    named = [line.strip() for line in str(e.value).splitlines()[1:]]
    assert [line.split(":")[0] for line in named] == [f"sample.prompts[{i}]" for i in bad]


def test_empty_prompt_in_a_config_file_exits_2_before_any_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  id: p\nsample:\n  prompts: ['床前明月光', '  ']\n", encoding="utf-8")
    r = entrypoint_process("run", f"--config={path}", f"--storage.bucket={tmp_path / 'bucket'}")
    assert r.returncode == 2, r.stderr
    assert "sample.prompts[1]: must hold text" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bucket").exists()  # refused before anything was written


def test_no_prompts_at_all_is_allowed():
    assert load_config(None, {"sample.prompts": []}, env={}).sample.prompts == ()


@pytest.mark.parametrize("prompt", ["", "   ", "\n", "\u3000"])
def test_generate_refuses_an_empty_prompt(capsys, model_folder, prompt):
    err = exits_2(capsys, "generate", f"--checkpoint={model_folder}", "--prompt", prompt)
    assert err.startswith("error: generate --prompt: must hold text")


def test_generate_empty_prompt_in_a_process_is_one_line(model_folder):
    r = entrypoint_process("generate", f"--checkpoint={model_folder}", "--prompt", "")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: generate --prompt") and r.stderr.count("\n") == 1, r.stderr


# generate --seed --------------------------------------------------------------------------------

def generated(capsys, folder, *args: str) -> str:
    entrypoint.main(["generate", f"--checkpoint={folder}", "--sample.max_new_tokens=24", "--sample.temperature=1.0",
                     "--train.device=cpu", *args])
    return capsys.readouterr().out


def test_generate_seed_makes_sampling_repeatable(capsys, model_folder):
    a = generated(capsys, model_folder, "--seed=7", "--prompt=春眠")
    assert a.startswith("春眠") and len(a.strip()) > len("春眠")
    assert generated(capsys, model_folder, "--seed=7", "--prompt=春眠") == a
    others = {generated(capsys, model_folder, f"--seed={s}", "--prompt=春眠") for s in (8, 9, 10)}
    assert others - {a}  # a random tiny model: another seed samples other tokens


def test_generate_prints_the_text_and_no_loading_bars(model_folder):
    r = entrypoint_process("generate", f"--checkpoint={model_folder}", "--prompt=春眠", "--sample.max_new_tokens=8",
                           "--train.device=cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("春眠")
    assert "Loading weights" not in r.stderr + r.stdout and "it/s]" not in r.stderr  # transformers' tqdm bars


def test_generate_from_an_export_in_s3(capsys, model_folder, new_s3_bucket):
    bucket = new_s3_bucket()
    bucket.open().upload_dir(model_folder, "runs/r/final")
    local = generated(capsys, model_folder, "--seed=5")
    remote = generated(capsys, f"{bucket.url}/runs/r/final", "--seed=5",
                       f"--storage.endpoint_url={bucket.endpoint_url}")
    assert remote == local and remote.startswith("床前明月光")


@pytest.mark.parametrize("seed", ["abc", "1.5", "true"])
def test_generate_bad_seed_exits_2(capsys, model_folder, seed):
    err = exits_2(capsys, "generate", f"--checkpoint={model_folder}", f"--seed={seed}")
    assert err.startswith("error: generate --seed: expected an integer")


# A --checkpoint with no model behind it -----------------------------------------------------------

def missing_forms(tmp_path) -> dict[str, str]:
    """Each way of naming a model, pointing where there is none (the s3 ones are added by the test)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no model here")
    bucket = tmp_path / "bucket"
    (bucket / "runs" / "r" / "checkpoints").mkdir(parents=True)
    return {
        "no such folder": str(tmp_path / "nowhere" / "final"),
        "a folder without a model": str(empty),
        "a file": str(empty / "README.md"),
        "a run that does not exist": f"{bucket}/runs/nope/checkpoints/step-5",
        "a step that does not exist": f"{bucket}/runs/r/checkpoints/step-00000005",
        "an export that does not exist": f"{bucket}/runs/r/final",
    }


@pytest.mark.parametrize("command", ["generate", "eval", "chat"])
def test_missing_checkpoint_is_one_line_exit_2(capsys, tmp_path, command):
    for form, url in missing_forms(tmp_path).items():
        err = exits_2(capsys, command, f"--checkpoint={url}")
        assert err.startswith(f"error: --checkpoint {url}: "), (form, err)


@pytest.mark.parametrize("command", ["generate", "eval", "chat"])
def test_missing_checkpoint_in_s3_is_one_line_exit_2(capsys, new_s3_bucket, command):
    bucket = new_s3_bucket()
    for url in (f"{bucket.url}/runs/r/final", f"{bucket.url}/runs/r/checkpoints/step-4", f"{bucket.url}/nothing"):
        err = exits_2(capsys, command, f"--checkpoint={url}", f"--storage.endpoint_url={bucket.endpoint_url}")
        assert err.startswith(f"error: --checkpoint {url}: "), err


def test_missing_checkpoint_in_a_process_has_no_traceback(tmp_path):
    for command in ("generate", "eval", "chat"):
        r = entrypoint_process(command, f"--checkpoint={tmp_path / 'nowhere'}", stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: --checkpoint")


# chat on a pipe, and Ctrl-C -----------------------------------------------------------------------

def test_chat_over_a_pipe(model_folder):
    r = entrypoint_process("chat", f"--checkpoint={model_folder}", "--sample.max_new_tokens=4",
                           "--train.device=cpu", input="你好\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "> 你好\n" in r.stdout and "> /exit\n" in r.stdout and "Traceback" not in r.stderr


def _sigint_as_on_a_terminal():
    """A command started in the background by a non-interactive shell (`cmd &`, as CI scripts may
    run the tests) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler;
    a user at a terminal has the default disposition. The child gets the terminal's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_chat_exits_130_quietly(model_folder):
    proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), "chat", f"--checkpoint={model_folder}",
                             "--train.device=cpu"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_on_a_terminal)
    try:
        assert proc.stdout.readline().startswith("commands:")  # loaded, waiting for a line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


class Interrupted:
    """stdin where the user types one line, then presses Ctrl-C."""

    def __init__(self, first: str):
        self.first = first

    def __iter__(self):
        yield self.first
        raise KeyboardInterrupt

    def isatty(self):
        return False


def test_ctrl_c_at_the_prompt(capsys, monkeypatch, model_folder):
    monkeypatch.setattr(sys, "stdin", Interrupted("/reset\n"))
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["chat", f"--checkpoint={model_folder}", "--train.device=cpu"])
    assert e.value.code == 130
    assert "(conversation cleared)" in capsys.readouterr().out  # the line before Ctrl-C was answered


def test_ctrl_c_while_a_reply_streams(capsys, monkeypatch, model_folder):
    import trainer.job.chat

    class Streamer:
        parts: list = []

        def put(self, value):
            raise KeyboardInterrupt

        def end(self):
            pass

    monkeypatch.setattr(trainer.job.chat, "_streamer", lambda tok, out: Streamer())
    monkeypatch.setattr(sys, "stdin", Interrupted("你好\n"))
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["chat", f"--checkpoint={model_folder}", "--train.device=cpu"])
    assert e.value.code == 130


# plan --out ---------------------------------------------------------------------------------------

def plan_out(capsys, out: Path, *args: str) -> dict:
    entrypoint.main(["plan", "--compute=1e19", *args, f"--out={out}"])
    capsys.readouterr()
    return yaml.safe_load(out.read_text(encoding="utf-8"))


def test_plan_out_picks_a_fresh_run_id(capsys, tmp_path):
    tree = plan_out(capsys, tmp_path / "a.yaml")
    run_id = tree["run"]["id"]
    assert run_id != "demo" and run_id.startswith(tree["model"]["preset"] + "-")
    assert load_config(str(tmp_path / "a.yaml"), {}, env={}).run.id == run_id  # `run` accepts it
    # deterministic: the same plan of the same base is the same run; anything else another one
    assert plan_out(capsys, tmp_path / "b.yaml")["run"]["id"] == run_id
    assert plan_out(capsys, tmp_path / "c.yaml", "--seq_len=2048")["run"]["id"] != run_id
    base = tmp_path / "base.yaml"
    base.write_text("run:\n  id: mine\ndata:\n  sources: [other]\n", encoding="utf-8")
    from_base = plan_out(capsys, tmp_path / "d.yaml", f"--config={base}")["run"]["id"]
    assert from_base not in (run_id, "mine")  # never the base's run: that run has other inputs


def test_plan_out_refuses_to_overwrite(capsys, tmp_path):
    out = tmp_path / "planned.yaml"
    out.write_text("mine: keep\n", encoding="utf-8")
    err = exits_2(capsys, "plan", "--compute=1e19", f"--out={out}")
    assert err == f"error: plan --out {out}: the file exists; pass --force to overwrite it\n"
    assert out.read_text(encoding="utf-8") == "mine: keep\n"
    entrypoint.main(["plan", "--compute=1e19", f"--out={out}", "--force"])
    assert "wrote" in capsys.readouterr().err
    assert load_config(str(out), {}, env={}).model.preset == yaml.safe_load(out.read_text())["model"]["preset"]


def test_plan_out_into_a_missing_folder_exits_2(capsys, tmp_path):
    out = tmp_path / "no" / "such" / "planned.yaml"
    err = exits_2(capsys, "plan", "--compute=1e19", f"--out={out}")
    assert str(out.parent) in err
    assert not out.parent.exists()


# Every checkpoint form, after a real tiny run ---------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config, cli):
    """A finished tiny `run` (one process): checkpoints at steps 4 and 8, and the export."""
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(root, {"run.id": "forms", "train.nproc": 1, "sample.at_checkpoints": False})
    path = cli.write_config(cfg, root / "tiny.yaml")
    result = cli.run("run", path)
    assert result.returncode == 0, result.stdout[-6000:]
    return cfg, path


@pytest.mark.slow
def test_generate_takes_every_checkpoint_form_eval_and_chat_take(capsys, trained):
    cfg, path = trained
    run = f"{cfg.storage.bucket}/runs/forms"
    texts = {}
    for url in (f"{run}/final", f"{run}/checkpoints/step-8", f"{run}/checkpoints/step-00000008/",
                f"{run}/checkpoints/step-4"):
        entrypoint.main(["generate", f"--checkpoint={url}", f"--config={path}", "--seed=3", "--prompt=床前"])
        texts[url] = capsys.readouterr().out
        assert texts[url].startswith("床前"), url
    # the export holds the step-8 weights: the same text, whichever way step 8 is named
    assert texts[f"{run}/final"] == texts[f"{run}/checkpoints/step-8"] == texts[f"{run}/checkpoints/step-00000008/"]
    r = entrypoint_process("chat", f"--checkpoint={run}/checkpoints/step-4", f"--config={path}", input="床前\n")
    assert r.returncode == 0 and "> 床前" in r.stdout, r.stderr


def test_short_count_by_hand():
    from trainer.model.plan_output import short_count

    cases = {5: "5", 999: "1k", 1234: "1.2k", 999_999: "1m", 2.6e9: "2.6b", 12.3e9: "12b", 150e9: "150b",
             99.6e9: "100b", 1.5e12: "1.5t"}
    assert {n: short_count(n) for n in cases} == cases
