"""model.init: a Hugging Face Llama to continue pretraining from. Its config.json is checked against
the run's settings (a LlamaForCausalLM, the model.* numbers set, train.seq_len within its context,
an embedding that covers the tokenizer) and gives the run's shape; its weights' fingerprint goes
into the inputs a resume is checked against. No torch: the folder's files only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from trainer.config.load import ConfigError
from trainer.config.schema import SHAPE_KEYS, Config, Shape

LLAMA_ARCHITECTURE = "LlamaForCausalLM"


def read_config(folder: Path, init: str) -> dict:
    """config.json of the init folder, refused (ConfigError, exit 2, one line naming the file and
    what it found) unless it is a LlamaForCausalLM (architectures, else model_type llama) with
    safetensors weights beside it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.init: {init}: no config.json there (a Hugging Face model folder has one)")
    hf = json.loads(path.read_text(encoding="utf-8"))
    arch, kind = hf.get("architectures") or [], hf.get("model_type")
    llama = (arch == [LLAMA_ARCHITECTURE] or (not arch and kind == "llama")) and kind in ("llama", None)
    if not llama:
        raise ConfigError(f"model.init: {path}: architectures {arch}, model_type {kind!r}; only "
                          f"{LLAMA_ARCHITECTURE} (model_type 'llama') continues pretraining here")
    if not weight_files(folder):
        raise ConfigError(f"model.init: {init}: no *.safetensors weights there (only safetensors load)")
    return hf


def shape_of(hf: dict) -> Shape:
    """The run's shape: the init's config.json numbers."""
    return Shape(n_layer=hf["num_hidden_layers"], d_model=hf["hidden_size"], n_head=hf["num_attention_heads"],
                 n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], d_ffn=hf["intermediate_size"])


def conflicts(cfg: Config, hf: dict, n_tokens: int | None = None) -> list[str]:
    """Every setting that disagrees with the init's config.json, each naming its key and the
    number there: a model.* number set (0 = the init's) that is not the init's, model.tie_embeddings
    true on an untied model, train.seq_len above its context (max_position_embeddings), and
    (n_tokens: the tokenizer's size) an embedding with fewer rows than the tokenizer has tokens.
    model.preset is not among them: with model.init it is not used (stages logs that)."""
    shape, problems = shape_of(hf), []
    for key in SHAPE_KEYS:
        set_to, init_value = getattr(cfg.model, key), getattr(shape, key)
        if set_to and set_to != init_value:
            problems.append(f"model.{key}={set_to} disagrees with model.init's config.json ({init_value}); "
                            f"leave it unset (0) to continue the model as it is")
    if cfg.model.tie_embeddings and not hf.get("tie_word_embeddings", False):
        problems.append("model.tie_embeddings=true disagrees with model.init's config.json (untied); "
                        "leave it unset to continue the model as it is")
    context = hf.get("max_position_embeddings")
    if context and cfg.train.seq_len > context:
        problems.append(f"train.seq_len={cfg.train.seq_len} is longer than model.init's context "
                        f"(max_position_embeddings {context}); set train.seq_len to at most {context}")
    if n_tokens is not None and n_tokens > hf["vocab_size"]:
        problems.append(f"model.init: its tokenizer has {n_tokens} tokens but the embedding only "
                        f"{hf['vocab_size']} rows (vocab_size in config.json)")
    return problems


def refuse(problems: list[str]) -> None:
    """ConfigError (exit 2): one line for one problem, else each on its own line."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def fingerprint(folder: Path) -> str:
    """sha256 over the names and sha256 of the init's safetensors files: the same weights give the
    same fingerprint wherever the folder came from (bucket, Hub cache, local copy)."""
    lines = []
    for path in weight_files(folder):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        lines.append(f"{path.name} {h.hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def description(hf: dict) -> str:
    s = shape_of(hf)
    return (f"{s.n_layer} layers, hidden {s.d_model}, {s.n_head} heads, {s.n_kv_head} kv heads, ffn {s.d_ffn}, "
            f"context {hf.get('max_position_embeddings')}, vocab {hf['vocab_size']}")
