"""Continued pretraining (model.init): a run starts from a Hugging Face Llama folder, with its
tokenizer, shape, context and weights, on another corpus.

A tiny model pretrained on one half of the tiny corpus and exported is the init; a run on the
other half continues from it: its first loss is far below a from-scratch model's, its tokenizer is
the export's files byte for byte (nothing trained), its export has the init's shape and says what
it continued from; FSDP on 2 processes starts from the same weights as 1 process; bad inputs are
refused with exit 2 and one line; a resume with other starting weights is refused, and a resume
continues the run's checkpoint exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.config import ConfigError, load_config, replace
from trainer.io.storage import open_storage
from trainer.job.run import run
from trainer.job.stages import TOKENIZER_FILES, init_model_dir
from trainer.model import hf_init
from trainer.state import protocol

pytestmark = pytest.mark.slow

SHAPE = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
         "vocab_size", "max_position_embeddings", "tie_word_embeddings")
CONTINUED = {"run.id": "cont", "train.seq_len": 16, "train.batch_tokens": 128, "train.micro_batch_size": 2,
             "train.max_steps": 4, "train.warmup_steps": 1, "train.log_every_steps": 1, "train.lr": 0.003,
             "train.checkpoint_every_steps": 2, "train.eval_every_steps": 2,
             "model.preset": "6m"}  # not used with model.init: the shape is the init's config.json


def ok(done):
    assert done.returncode == 0, done.stdout[-6000:]
    return done.stdout


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_config, tiny_docs, cli):
    """(root, the init's export folder, a config maker for runs on the other corpus): the tiny model
    pretrained for 120 steps on the first half of the tiny corpus and exported."""
    root = tmp_path_factory.mktemp("model-init")
    half = len(tiny_docs) // 2
    corpus_a = write_corpus(root / "corpus-a" / "a.jsonl", tiny_docs[:half])
    corpus_b = write_corpus(root / "corpus-b" / "b.jsonl", tiny_docs[half:])
    base = tiny_config(root, {"run.id": "base", "data.sources": [str(corpus_a)], "train.max_steps": 120,
                              "train.lr": 0.01, "train.batch_tokens": 1024, "train.micro_batch_size": 8,
                              "train.warmup_steps": 10, "train.checkpoint_every_steps": 120,
                              "train.eval_every_steps": 120, "train.log_every_steps": 10})
    path = cli.write_config(base, root / "base.yaml")
    ok(cli.run("pretrain", path))
    ok(cli.run("export", path))
    export = Path(base.storage.bucket) / "runs" / "base" / "final"

    def make(overrides: dict | None = None):
        return replace(base, **{"data.sources": [str(corpus_b)], "model.init": str(export), **CONTINUED,
                                **(overrides or {})})
    return root, export, make


@pytest.fixture(scope="module")
def continued(setup, cli, metrics):
    """`run` with model.init on the other corpus (4 steps, sequences of 16 of the init's 32)."""
    root, export, make = setup
    cfg = make()
    out = ok(cli.run("run", cli.write_config(cfg, root / "cont.yaml")))
    return cfg, out, metrics(open_storage(cfg.storage.bucket), "cont")


def test_it_starts_from_the_init_weights(setup, continued, cli, metrics):
    """The first step's loss (before any update) is far below a from-scratch model's on the same
    corpus: the weights are the init's, not a fresh draw."""
    root, _, make = setup
    scratch = replace(make({"run.id": "scratch", "train.max_steps": 2}), **{"model.init": "", "model.preset": "tiny"})
    ok(cli.run("pretrain", cli.write_config(scratch, root / "scratch.yaml")))
    from_scratch = metrics(open_storage(scratch.storage.bucket), "scratch")[0]["loss"]
    first = continued[2][0]["loss"]
    assert first < from_scratch - 1.0, (first, from_scratch)


def test_the_tokenizer_is_the_inits_files_byte_for_byte(setup, continued):
    cfg, out, _ = continued
    export = setup[1]
    store = open_storage(cfg.storage.bucket)
    key = json.loads(store.read_text("runs/cont/artifacts.json"))["tokenizer_key"]
    names = {Path(o.key).name for o in store.list(key + "/")} - {protocol.MANIFEST}
    assert names == {n for n in TOKENIZER_FILES if (export / n).is_file()}  # no weights, no training report
    for name in names:
        assert store.read_bytes(f"{key}/{name}") == (export / name).read_bytes(), name
    assert "tokenizer: training" not in out and "model.init: continuing" in out
    assert "model.preset=6m is not used" in out


def test_the_export_has_the_inits_shape_and_says_where_it_came_from(setup, continued):
    cfg, _, rows = continued
    export = setup[1]
    store = open_storage(cfg.storage.bucket)
    init, new = (json.loads(p) for p in ((export / "config.json").read_text(),
                                         store.read_text("runs/cont/final/config.json")))
    assert {k: new.get(k) for k in SHAPE} == {k: init.get(k) for k in SHAPE}
    assert new["max_position_embeddings"] == 32  # the init's context, though it trained on 16
    assert f"continued from `{export}`" in store.read_text("runs/cont/final/README.md")
    assert f"continued from {export}" in store.read_text("runs/cont/report/report.md")
    from trainer.job.status import base_model

    assert base_model(store, {"run": {"id": "cont"}, "model": {"init": str(export)}}, "cont").endswith(str(export))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_fsdp_on_two_processes_starts_from_the_same_weights(setup, continued, cli, metrics):
    root, _, make = setup
    cfg = make({"run.id": "fsdp", "train.max_steps": 2, "train.strategy": "fsdp", "train.nproc": 2})
    out = ok(cli.run("pretrain", cli.write_config(cfg, root / "fsdp.yaml")))
    assert "on 2 x cpu (fsdp)" in out
    first = metrics(open_storage(cfg.storage.bucket), "fsdp")[0]["loss"]
    assert first == pytest.approx(continued[2][0]["loss"], rel=1e-5)


def test_a_resume_continues_the_checkpoint_exactly(setup, continued, single_process):
    """Step 4's checkpoint withdrawn (its manifest gone): the rerun resumes step 2's checkpoint, not
    the init, and steps 3 and 4 repeat the straight run's numbers."""
    cfg, _, rows = continued
    store = open_storage(cfg.storage.bucket)
    store.delete(f"{protocol.checkpoints_prefix('cont')}/{protocol.step_name(4)}/{protocol.MANIFEST}")
    assert protocol.complete_steps(store, "cont") == [2]
    assert run(cfg) == 0
    again = [json.loads(line) for line in store.read_text("runs/cont/metrics.jsonl").splitlines() if line.strip()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["loss"] for r in again[2:]] == [r["loss"] for r in rows[2:]]


def test_a_resume_with_other_starting_weights_is_refused(setup, continued, tmp_path):
    cfg = continued[0]
    other = tmp_path / "other"
    shutil.copytree(setup[1], other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:
        run(replace(cfg, **{"model.init": str(other), "train.max_steps": 8}))
    message = str(e.value)
    assert "\n" not in message and "init: sha256:" in message and "run.id=cont" in message, message


def non_llama(export: Path, dest: Path) -> Path:
    shutil.copytree(export, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"],
                                                  "model_type": "gpt2"}))
    return dest


@pytest.mark.parametrize("case", ["no config.json", "not llama", "seq_len", "override"])
def test_bad_inputs_are_refused_with_one_line(setup, tmp_path, case):
    _, export, make = setup
    (tmp_path / "empty").mkdir()
    overrides, needles = {
        "no config.json": ({"model.init": str(tmp_path / "empty")}, ["model.init", "no config.json"]),
        "not llama": ({"model.init": str(non_llama(export, tmp_path / "gpt2"))},
                      [str(tmp_path / "gpt2" / "config.json"), "GPT2LMHeadModel", "'gpt2'", "LlamaForCausalLM"]),
        "seq_len": ({"train.seq_len": 64, "train.batch_tokens": 256}, ["train.seq_len=64", "32"]),
        "override": ({"model.n_layer": 3}, ["model.n_layer=3", "(2)"]),
    }[case]
    cfg = make({"run.id": f"bad-{case.replace(' ', '-').replace('.', '')}", **overrides})
    with pytest.raises(ConfigError) as e:
        run(cfg)
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_bad_input_through_the_cli_exits_2(setup, cli):
    root, _, make = setup
    done = cli.run("tokenizer", cli.write_config(make({"run.id": "bad-cli", "model.d_model": 128}), root / "bad.yaml"))
    assert done.returncode == 2, done.stdout[-3000:]
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.d_model=128" in errors[0], done.stdout[-3000:]


def test_an_override_equal_to_the_inits_number_is_fine_and_the_preset_is_logged(setup, caplog):
    cfg = setup[2]({"model.n_layer": 2, "model.d_model": 64})
    with caplog.at_level("INFO", logger="trainer"):
        folder, hf = init_model_dir(cfg)
    assert folder == setup[1] and hf_init.shape_of(hf).n_layer == 2
    assert "model.preset=6m is not used" in caplog.text


def test_tokenizer_path_with_model_init_is_a_config_error(setup):
    with pytest.raises(ConfigError, match="tokenizer.path: must be empty with model.init"):
        load_config(None, {"model.init": str(setup[1]), "tokenizer.path": str(setup[1])}, env={})


def test_non_llama_configs_by_hand(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    for config, ok_ in (({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, True),
                        ({"model_type": "llama"}, True),
                        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, False),
                        ({"architectures": ["LlamaForCausalLM"], "model_type": "qwen2"}, False),
                        ({}, False)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        if ok_:
            hf_init.read_config(tmp_path, "x")
        else:
            with pytest.raises(ConfigError, match="only LlamaForCausalLM"):
                hf_init.read_config(tmp_path, "x")


def test_a_hub_id_is_fetched_through_huggingface_hub(setup, monkeypatch, tmp_path):
    """owner/name with no such local path goes to huggingface_hub.snapshot_download (here a fake
    that copies the export); an unreachable Hub is one line, exit 2."""
    import huggingface_hub

    _, export, make = setup
    asked = []

    def fake(repo_id, local_dir, allow_patterns):
        asked.append(repo_id)
        shutil.copytree(export, local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder, hf = init_model_dir(make({"model.init": "someone/tiny-llama"}))
    assert asked == ["someone/tiny-llama"] and (folder / "model.safetensors").is_file()
    assert hf == json.loads((export / "config.json").read_text())

    def offline(repo_id, local_dir, allow_patterns):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError) as e:
        init_model_dir(make({"model.init": "someone/other-llama"}))
    assert "\n" not in str(e.value) and "someone/other-llama" in str(e.value) and "Hub" in str(e.value)
