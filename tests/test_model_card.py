"""The export's model card (trainer/model/model_card.py): its numbers come from the run's files."""

import pytest
import yaml

from trainer.model.model_card import last_validation, model_card, parameter_count

CONFIG = {"run": {"id": "r"}, "model": {"preset": "tiny"}, "tokenizer": {"vocab_size": 512, "pre_tokenizer": "qwen2"},
          "data": {"sources": ["corpus/*.jsonl.zst"]},
          "train": {"optimizer": "muon", "lr": 0.0008, "weight_decay": 1.6, "schedule": "cosine",
                    "warmup_steps": 100, "batch_tokens": 32768, "seq_len": 512, "seed": 7},
          "sft": {"init": "s3://b/runs/base/final", "sources": ["chats.jsonl"], "lr": 1e-4, "warmup_steps": 10,
                  "batch_sequences": 16},
          "sample": {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}}
STATE = {"step": 2996, "tokens_seen": 98172928, "wall_seconds": 250.4, "world_size": 1, "skipped_steps": 2,
         "rollbacks": 0}
INDEX = {"train": [{"tokens": 19629540}], "documents": {"train": 321815, "val": 1633}, "chars": {"train": 26215641}}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv", [4, 2])
def test_parameter_count_is_transformers_count(tie, kv):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = {"hidden_size": 64, "vocab_size": 300, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": kv, "intermediate_size": 192, "tie_word_embeddings": tie,
          "max_position_embeddings": 128}
    model = LlamaForCausalLM(LlamaConfig(**hf))
    assert parameter_count(hf) == sum(p.numel() for p in model.parameters())


def test_last_validation_is_the_last_row_with_a_val_loss():
    rows = [{"step": 1, "loss": 9.0}, {"step": 2, "val_loss": 5.0, "val_bpc": 6.0}, {"step": 3, "loss": 4.0},
            {"step": 4, "val_loss": 4.5}, {"step": 5, "loss": 3.0}]
    assert last_validation(rows) == {"step": 4, "val_loss": 4.5}
    assert last_validation([{"step": 1, "loss": 2.0}]) is None and last_validation([]) is None


HF = {"hidden_size": 64, "vocab_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 4, "intermediate_size": 192, "max_position_embeddings": 256}


def test_pretraining_card_states_what_trained_how_long_and_its_score():
    rows = [{"step": 2996, "val_loss": 4.501, "val_bpc": 4.922}]
    card = model_card("r", CONFIG, STATE, HF, INDEX, rows)
    meta, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert yaml.safe_load(meta)["language"] == ["zh"] and yaml.safe_load(meta)["library_name"] == "transformers"
    assert "| optimizer steps | 2,996 |" in body and "| tokens seen | 98,172,928 |" in body
    assert "| epochs | 5.00 |" in body  # 98,172,928 / 19,629,540
    assert "| training time | 4m10s on 1 process(es) |" in body
    assert "| documents (train / validation) | 321,815 / 1,633 |" in body
    assert "lr 0.0008, weight decay 1.6" in body and "| seed | 7 |" in body
    assert "step 2996: loss 4.501 nats per token, 4.922 bits per character" in body
    assert f"{parameter_count(HF) / 1e6:.1f} M parameters" in body and "`corpus/*.jsonl.zst`" in body
    assert "pretrained from scratch (preset `tiny`)" in body


def test_sft_card_names_the_base_model_and_sft_settings_and_omits_missing_scores():
    card = model_card("r-sft", CONFIG, STATE, HF, None, [], stage="sft")
    assert "fine-tuned on conversations from `s3://b/runs/base/final`" in card
    assert "lr 0.0001" in card and "10 warm-up steps" in card and "`chats.jsonl`" in card
    assert "16 conversations' packed rows per step" in card
    assert "## Scores" not in card and "epochs" not in card  # nothing guessed
