"""train.float8: torchao's Float8Linear in the decoder layers only, checkpoints unchanged, and a
one-line config error (exit 2) where it cannot run. FP8 matmuls themselves need a Hopper/Ada GPU:
their speed is in bench/RESULTS.md, not here. The conversion test needs torchao, which only the
image has: `make test-image-torch` (CI's third step) runs it with the image's torch and torchao;
`make test`'s venv has no torchao (transformers imports it whenever installed)."""

import pytest
import torch

from trainer.training.parallelize import float8_training


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))


def test_only_the_decoder_layers_linear_layers_become_float8_and_the_weights_keep_their_names():
    pytest.importorskip("torchao", reason="the image's torchao: make test-image-torch runs this")
    from torchao.float8.float8_linear import Float8Linear

    model = tiny_llama()
    before = model.state_dict()
    converted = float8_training(model)
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]
    assert sorted(converted) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in per_layer)
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in converted)
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    after = model.state_dict()  # a checkpoint or export of a float8 run is the same stock model
    assert after.keys() == before.keys()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)


def test_float8_where_it_cannot_run_is_a_config_error_before_anything_runs(tmp_path, monkeypatch):
    import importlib.util

    from trainer.config import ConfigError, load_config
    from trainer.job.stages import check_before_start

    real = importlib.util.find_spec  # torchao installed or not: the device is what is missing here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torchao" else real(name, *a))

    cfg = load_config(None, {"train.float8": True, "train.device": "cpu", "storage.local_dir": str(tmp_path / "w")},
                      env={})
    with pytest.raises(ConfigError, match="train.float8 needs a GPU with FP8 tensor cores"):
        check_before_start(cfg)
    assert not (tmp_path / "w").exists()


def test_float8_without_torchao_names_the_package(tmp_path, monkeypatch):
    import importlib.util

    from trainer.config import ConfigError, load_config
    from trainer.job.stages import check_before_start

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    cfg = load_config(None, {"train.float8": True, "storage.local_dir": str(tmp_path / "w")}, env={})
    with pytest.raises(ConfigError, match="train.float8 needs torchao"):
        check_before_start(cfg)
