"""Exports that load everywhere (issue 16): the tokenizer folder loads with AutoTokenizer in
transformers 5 (this venv) and 4.x (a second small venv, .venv/tf4-*, made here from PyPI on first
use: transformers and jinja2, no torch), encoding and decoding alike; config.json holds every key
vLLM's Llama loader reads, with the values transformers 4 and 5 both see; generation_config.json
carries sample.* in both versions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.data.tokenizer import (
    CHAT_TEMPLATE,
    EOS,
    IM_END,
    IM_START,
    LOAD_TIME_KEYS,
    PAD,
    load_tokenizer,
    portable_tokenizer_config,
    save_tokenizer,
    train_tokenizer,
)
from trainer.model.hf_files import export_generation_config, portable_model_config
from trainer.model.llama import build_model, llama_config

ROOT = Path(__file__).resolve().parent.parent

# The oldest 4.x we promise (tokenizers 0.20) and the newest (tokenizers 0.22): the tokenizer.json
# our tokenizers 0.2x writes must load in both.
TF4_VENVS = {"tf4-newest": ("transformers>=4.46,<5", "jinja2>=3.1"),
             "tf4-oldest": ("transformers==4.46.3", "jinja2>=3.1")}

# config.json keys that vLLM's LlamaForCausalLM reads (vllm/model_executor/models/llama.py and its
# config handling): the registry picks the class from `architectures`; the layers read the sizes,
# head_dim (or hidden_size // num_attention_heads), hidden_act (SiluAndMul: "silu" only),
# attention_bias / mlp_bias, rms_norm_eps, RoPE (rope_theta and rope_scaling on transformers 4,
# rope_parameters on 5), max_position_embeddings (max_model_len), tie_word_embeddings, vocab_size;
# the dtype ("auto") comes from torch_dtype / dtype; bos/eos from config and generation_config.
VLLM_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "attention_bias", "mlp_bias",
             "rms_norm_eps", "rope_theta", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
             "torch_dtype", "dtype", "bos_token_id", "eos_token_id")

TEXTS = ["床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。", "Hello world 2024!", f"你好{IM_END}\n{EOS}{PAD}",
         "  空格  與\t製表\n\n"]
CHAT = [{"role": "system", "content": "你是詩人。"}, {"role": "user", "content": "寫一首詩"}]

# Run in this process (transformers 5) and, as a script, by the 4.x venvs: the same code in both.
PROBE = r'''
import json, os, sys
import transformers
from transformers import AutoConfig, AutoTokenizer, GenerationConfig


def plain(value):
    return value if value is None or isinstance(value, (bool, int, float, str, list, dict)) else str(value)


def probe(folder, texts, chat):
    tok = AutoTokenizer.from_pretrained(folder)
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    out = {"version": transformers.__version__, "class": type(tok).__name__,
           "model_max_length": tok.model_max_length, "eos": [tok.eos_token, tok.eos_token_id],
           "pad": [tok.pad_token, tok.pad_token_id], "bos": tok.bos_token, "special": sorted(tok.all_special_tokens),
           "ids": ids, "decoded": [tok.decode(i) for i in ids],
           "skipped": [tok.decode(i, skip_special_tokens=True) for i in ids],
           "chat": tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
           # what model.generate(**tok(p, return_tensors="pt")) passes: token_type_ids would be refused
           "inputs": sorted(tok(texts[0]).keys())}
    if os.path.isfile(os.path.join(folder, "config.json")):
        c = AutoConfig.from_pretrained(folder)
        rope = getattr(c, "rope_parameters", None) or {}
        out["config"] = {
            "architectures": c.architectures, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
            "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": c.hidden_act,
            "rope_theta": getattr(c, "rope_theta", None) or rope.get("rope_theta"),
            "rope_type": (getattr(c, "rope_scaling", None) or rope or {}).get("rope_type", "default"),
            "dtype": str(getattr(c, "dtype", None) or c.torch_dtype).replace("torch.", ""),
            "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
        g = GenerationConfig.from_pretrained(folder)
        out["generation"] = {k: plain(getattr(g, k)) for k in (
            "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "eos_token_id",
            "pad_token_id")}
    return out


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))))
'''


def probe_here(folder: Path) -> dict:
    namespace: dict = {}
    exec(PROBE, namespace)  # noqa: S102 - our own probe, the same text the 4.x venv runs
    return json.loads(json.dumps(namespace["probe"](str(folder), TEXTS, CHAT)))


def venv_python(name: str) -> Path:
    """.venv/<name>/bin/python with TF4_VENVS[name] installed, made on first use (about 15 s from
    PyPI, 260 MB) and kept: a stamp file names what was installed, so a changed spec remakes it.
    A lock file keeps two test runs from building the same venv at once."""
    import fcntl
    import shutil

    spec = TF4_VENVS[name]
    venv = ROOT / ".venv" / name
    python, stamp = venv / "bin" / "python", venv / ".installed"
    venv.parent.mkdir(exist_ok=True)
    with open(venv.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == " ".join(spec) and python.is_file():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *spec]]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.fail(f"could not make {venv} ({' '.join(spec)}; needs PyPI): {done.stderr[-2000:]}")
        stamp.write_text(" ".join(spec))
    return python


def probe_tf4(name: str, folder: Path) -> dict:
    script = folder.parent / "probe_tf4.py"
    script.write_text(PROBE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["TRANSFORMERS_VERBOSITY"] = "error"  # "None of PyTorch ... found" is expected: no torch there
    done = subprocess.run([str(venv_python(name)), str(script), str(folder), json.dumps(TEXTS), json.dumps(CHAT)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tiny_docs):
    return train_tokenizer(tiny_docs, 512, 4)


@pytest.fixture(scope="module", params=["trained", "reloaded"])
def tokenizer_dir(request, trained, tmp_path_factory) -> Path:
    """The run's tokenizer as train_from_corpus saves it ("trained": a tokenizers.Tokenizer), and
    the export's copy of it ("reloaded": loaded by transformers 5, which adds is_local and
    local_files_only, then saved for a 128-token model)."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "trained":
        save_tokenizer(trained, root / "tok", 128)
    else:
        save_tokenizer(trained, root / "run-tokenizer")
        loaded = load_tokenizer(root / "run-tokenizer")
        loaded.save_pretrained(str(root / "plain"))  # what tok.save_pretrained alone writes
        assert "is_local" in json.loads((root / "plain" / "tokenizer_config.json").read_text())
        save_tokenizer(loaded, root / "tok", 128)
    return root / "tok"


def test_tokenizer_config_is_portable(tokenizer_dir):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 128
    assert not set(LOAD_TIME_KEYS) & set(config) and "extra_special_tokens" not in config
    assert config["chat_template"] == CHAT_TEMPLATE and not (tokenizer_dir / "chat_template.jinja").exists()
    assert (config["eos_token"], config["pad_token"], config["additional_special_tokens"]) == (
        EOS, PAD, [IM_START, IM_END])


def test_tokenizer_loads_alike_in_transformers_5(tokenizer_dir, trained):
    here = probe_here(tokenizer_dir)
    assert here["version"].startswith("5.")
    assert here["model_max_length"] == 128
    assert here["eos"] == [EOS, trained.token_to_id(EOS)] and here["pad"] == [PAD, trained.token_to_id(PAD)]
    assert here["special"] == sorted([EOS, PAD, IM_START, IM_END]) and here["bos"] is None
    assert here["ids"] == [e.ids for e in trained.encode_batch(TEXTS, add_special_tokens=False)]
    assert here["decoded"] == TEXTS
    assert here["inputs"] == ["attention_mask", "input_ids"]
    assert here["skipped"][2] == "你好\n"
    assert here["chat"] == "<|im_start|>system\n你是詩人。<|im_end|>\n<|im_start|>user\n寫一首詩<|im_end|>\n" \
                           "<|im_start|>assistant\n"


@pytest.mark.parametrize("venv", sorted(TF4_VENVS))
def test_tokenizer_loads_alike_in_transformers_4(tokenizer_dir, venv):
    there = probe_tf4(venv, tokenizer_dir)
    assert there["version"].startswith("4.")
    assert there["class"] == "PreTrainedTokenizerFast"
    assert {k: v for k, v in there.items() if k not in ("version", "class")} == {
        k: v for k, v in probe_here(tokenizer_dir).items() if k not in ("version", "class")}


def test_portable_tokenizer_config_by_hand():
    five = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "is_local": True,
            "local_files_only": False, "extra_special_tokens": ["<a>", "<b>"], "model_max_length": 10 ** 30,
            "eos_token": "</s>", "additional_special_tokens": ["<a>"]}
    assert portable_tokenizer_config(five, 64, "{{ x }}") == {
        "tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<a>", "<b>"],
        "model_max_length": 64, "eos_token": "</s>", "chat_template": "{{ x }}",
        "model_input_names": ["input_ids", "attention_mask"]}
    other = {"tokenizer_class": "Qwen2Tokenizer", "extra_special_tokens": {"image_token": "<img>"},
             "model_max_length": 32768}
    assert portable_tokenizer_config(other, None, None) == {  # a class both know, named tokens: kept
        **other, "model_input_names": ["input_ids", "attention_mask"]}
    assert portable_tokenizer_config({**other, "model_input_names": ["input_ids"]}, None, None)[
        "model_input_names"] == ["input_ids"]  # a tokenizer's own list is kept
    assert portable_tokenizer_config({}, 8, None)["tokenizer_class"] == "PreTrainedTokenizerFast"
    for bad in (0, -1, True, 1.5, "64"):
        with pytest.raises(ValueError, match="model_max_length"):
            portable_tokenizer_config(five, bad, None)


# config.json and generation_config.json ------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(trained, tmp_path_factory) -> Path:
    """A tiny checkpoint folder written by checkpoint.save, whose Hugging Face files are what an
    export copies, from a model set up as tasks.py sets it up (generation_config from
    export_generation_config) and the run's tokenizer as the job loads it. RoPE base 500000 (not
    transformers 4's default 10000), so a dropped rope_theta would show."""
    import torch

    from trainer.state import checkpoint
    root = tmp_path_factory.mktemp("export")
    cfg = load_config(None, {"sample.temperature": 0.7, "sample.top_k": 0, "sample.max_new_tokens": 40}, env={})
    save_tokenizer(trained, root / "run-tokenizer")
    tok = load_tokenizer(root / "run-tokenizer")
    config = llama_config("tiny", len(tok), 128, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    model = build_model(config, "sdpa")
    model.generation_config = export_generation_config(cfg.sample, tok.eos_token_id, tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(root / "final", model, tok, optimizer, {"step": 1}, "", [])
    return root / "final"


def test_export_config_has_every_key_vllm_reads(export_dir):
    config = json.loads((export_dir / "config.json").read_text())
    assert [k for k in VLLM_KEYS if k not in config] == []
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["hidden_act"] == "silu"
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 500000.0
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["max_position_embeddings"] == 128
    assert config["vocab_size"] % 64 == 0  # padded rows: vLLM shards the embedding evenly


@pytest.mark.parametrize("venv", sorted(TF4_VENVS))
def test_export_reads_the_same_in_transformers_4_and_5(export_dir, venv):
    here, there = probe_here(export_dir), probe_tf4(venv, export_dir)
    assert here["config"]["rope_theta"] == 500000.0 and here["config"]["dtype"] == "float32"
    assert there["config"] == here["config"]
    assert here["generation"] == {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.95,
                                  "repetition_penalty": 1.1, "max_new_tokens": 40,
                                  "eos_token_id": here["eos"][1], "pad_token_id": here["pad"][1]}
    assert there["generation"] == here["generation"]  # every field explicit: no 4.x default (top_k 50) leaks in
    assert there["ids"] == here["ids"] and there["model_max_length"] == 128


def test_portable_model_config_by_hand():
    five = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "dtype": "bfloat16"}
    assert portable_model_config(five) == {**five, "rope_theta": 10000.0, "torch_dtype": "bfloat16"}
    yarn = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
    assert portable_model_config(yarn)["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    four = {"rope_theta": 5.0, "torch_dtype": "float16"}
    assert portable_model_config(four) == four  # nothing to add, nothing changed
    assert "rope_theta" not in five and "torch_dtype" not in five  # the argument is left alone
