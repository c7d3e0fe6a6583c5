import math

import pytest
import torch

from trainer.evaluation.evaluate import (
    bits_per_character,
    degeneration_report,
    distinct_n,
    evaluate_bpc,
    pack_windows,
    prompt_repetition,
    repeated_ngram_fraction,
)
from trainer.model.llama import build_model, llama_config

LINES = [
    "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。",
    "春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多少。",
    "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。",
    "千山鳥飛絕，萬徑人蹤滅。孤舟蓑笠翁，獨釣寒江雪。",
]


def test_distinct_n_by_hand():
    assert distinct_n(["abab"], 1) == 0.5  # a b a b: 2 unique of 4
    assert distinct_n(["abab", "abc"], 2) == 0.6  # ab ba ab | ab bc: 3 unique of 5
    assert distinct_n(["明月明月"], 2) == pytest.approx(2 / 3)  # 明月 月明 明月
    assert distinct_n(["a"], 2) == 0.0  # no bigrams at all
    with pytest.raises(TypeError):
        distinct_n("abc", 1)


def test_repeated_ngram_fraction_by_hand():
    assert repeated_ngram_fraction("abcabc", 2) == pytest.approx(2 / 5)  # ab bc ca ab* bc*
    # 床前明月 前明月光 明月光床 月光床前 光床前明 床前明月* 前明月光*: 2 of 7 seen before
    assert repeated_ngram_fraction("床前明月光床前明月光", 4) == pytest.approx(2 / 7)
    assert repeated_ngram_fraction("床前明月光", 4) == 0.0
    assert repeated_ngram_fraction("abc", 4) == 0.0  # shorter than n


def test_prompt_repetition_counts_copies():
    assert prompt_repetition("床前明月光", "，疑是地上霜。床前明月光，床前明月光") == 2
    assert prompt_repetition("床前明月光", "，疑是地上霜。") == 0
    assert prompt_repetition("", "anything") == 0


def test_bits_per_character_by_hand():
    assert bits_per_character(10 * math.log(2), 5) == pytest.approx(2.0)  # 10 bits over 5 characters
    with pytest.raises(ValueError, match="n_characters"):
        bits_per_character(1.0, 0)


def test_degeneration_report_by_hand():
    r = degeneration_report(["ab", "xy"], ["abab", "cdef"])
    assert r["samples"] == 2 and r["mean_chars"] == 4.0
    assert r["distinct_1"] == pytest.approx(6 / 8)  # a b a b c d e f
    assert r["distinct_2"] == pytest.approx(5 / 6)  # ab ba ab | cd de ef
    assert r["repeated_4gram_fraction"] == 0.0  # one 4-gram each, never repeated
    assert r["prompt_repetition_mean"] == 1.0  # "ab" twice in abab, "xy" never
    assert r["prompt_repeated_fraction"] == 0.5
    human = degeneration_report(None, ["abab"])
    assert "prompt_repetition_mean" not in human
    with pytest.raises(ValueError, match="prompts"):
        degeneration_report(["a"], ["b", "c"])


def test_pack_windows_predicts_every_token_once():
    windows = pack_windows(list(range(10)), 4)
    assert windows == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert [t for w in windows for t in w[1:]] == list(range(1, 10))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(LINES * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = build_model(llama_config("tiny", len(tokenizer), 256, eos_token_id=tokenizer.eos_token_id))
    return model, tokenizer


def _stream(tokenizer, texts):
    eos = tokenizer.eos_token_id
    ids = [eos]
    for t in texts:
        ids += tokenizer.encode(t, add_special_tokens=False) + [eos]
    return ids


def test_bpc_of_one_window_matches_hf_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    stream = _stream(tokenizer, LINES)
    assert len(stream) <= 257  # everything fits one window of 256 predictions
    with torch.no_grad():
        x = torch.tensor([stream])
        hf_loss = float(model(input_ids=x, labels=x).loss)  # mean over the len - 1 predicted tokens
    chars = sum(len(t) for t in LINES)
    out = evaluate_bpc(model, tokenizer, LINES, seq_len=256, device="cpu", batch_size=4)
    assert out["tokens"] == len(stream) - 1 and out["chars"] == chars == 96
    assert out["val_loss"] == pytest.approx(hf_loss, rel=1e-5)
    assert out["bits_per_char"] == pytest.approx(hf_loss * out["tokens"] / (chars * math.log(2)), rel=1e-5)
    # an untrained model is near uniform over its padded vocabulary
    assert out["val_loss"] == pytest.approx(math.log(model.config.vocab_size), rel=0.1)


def test_bpc_over_many_windows_and_padded_batches(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    stream = _stream(tokenizer, LINES)
    expected = 0.0
    with torch.no_grad():  # one window at a time, with the HF loss: no batching, no padding
        for start in range(0, len(stream) - 1, 16):
            w = torch.tensor([stream[start:start + 17]])
            expected += float(model.eval()(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
    model.train()
    out = evaluate_bpc(model, tokenizer, LINES, seq_len=16, device="cpu", batch_size=3)
    assert model.training  # mode restored
    assert out["nll_nats"] == pytest.approx(expected, rel=1e-5)
    assert out["bits_per_char"] == pytest.approx(expected / (96 * math.log(2)), rel=1e-5)
    assert out["tokens"] == len(stream) - 1


def test_evaluate_bpc_needs_eos_and_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="texts"):
        evaluate_bpc(model, tokenizer, ["", ""], seq_len=16, device="cpu")
