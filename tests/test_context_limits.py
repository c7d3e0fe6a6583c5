"""Context limits, one rule for generate, eval, chat and checkpoint samples (issue 23): a prompt that
leaves no room for a new token within the model's context is refused naming the limit (exit 2 in
generate and eval, chat refuses the message and goes on); generation stops at the context, with a
warning. `generate` and `chat` without --config sample by the export's own generation_config.json."""

import shutil

import pytest

import entrypoint
from faults import chat_model  # noqa: F401 - fixture
from trainer.config import ConfigError, SampleConfig, load_config

LONG = "床前明月光，疑是地上霜。" * 60  # far over the 256-token context of faults.chat_model


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_DIR", str(tmp_path / "work"))


def cli_exit(capsys, *args: str) -> tuple[int, str, str]:
    code = 0
    try:
        entrypoint.main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_refuses_a_prompt_longer_than_the_context(chat_model, capsys):
    code, out, err = cli_exit(capsys, "generate", "--checkpoint", str(chat_model), "--prompt", LONG)
    [error] = [line for line in err.splitlines() if line.startswith("error")]  # one line (after transformers' bars)
    assert code == 2 and out == "" and err.endswith(error + "\n")
    assert error.startswith("error: generate --prompt: the prompt is ") and "context is 256 tokens" in error


def test_generate_stops_at_the_context_with_a_warning(chat_model, capsys, monkeypatch):
    from transformers import AutoTokenizer

    import trainer.evaluation.generate as gen

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    prompt = "床前明月光，疑是地上霜。" * 8
    n = len(tok(prompt).input_ids)
    asked = []
    real = gen.new_token_budget
    monkeypatch.setattr(gen, "new_token_budget", lambda *a: asked.append(real(*a)) or asked[-1])
    code, out, err = cli_exit(capsys, "generate", "--checkpoint", str(chat_model), "--prompt", prompt,
                              "--sample.max_new_tokens=1000", "--sample.temperature=0")
    assert code == 0 and asked == [256 - n]
    assert f"generating at most {256 - n} tokens, not 1000" in err and out.startswith(prompt)


def test_eval_and_checkpoint_samples_refuse_the_same_prompt(chat_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.evaluation.evaluate import evaluate_model
    from trainer.evaluation.generate import continue_texts, sample

    model = AutoModelForCausalLM.from_pretrained(str(chat_model)).eval()
    tok = AutoTokenizer.from_pretrained(str(chat_model))
    cfg = load_config(None, {"sample.prompts": ["床前", LONG], "storage.local_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"sample\.prompts\[1\]: the prompt is \d+ tokens; .*context is 256"):
        evaluate_model(model, tok, cfg, heldout=[])
    with pytest.raises(ConfigError, match=r"sample\.prompts\[0\].*context is 256"):  # what tasks.at_checkpoint calls
        sample(model, tok, [LONG], SampleConfig(max_new_tokens=2))
    with pytest.raises(ConfigError, match="context is 256"):
        continue_texts(model, tok, [LONG], "greedy", 2)


def test_chat_refuses_the_same_message_and_goes_on(chat_model):
    from transformers import AutoModelForCausalLM

    from trainer.data.conversations import load_chat_tokenizer
    from trainer.job.chat import chat_loop

    model = AutoModelForCausalLM.from_pretrained(str(chat_model)).eval()
    out = []

    class Out:
        write = out.append

        def flush(self):
            pass

    turns = chat_loop(model, load_chat_tokenizer(chat_model), SampleConfig(max_new_tokens=4, temperature=0),
                      lines=[LONG, "床前明月光"], out=Out())
    assert "does not fit the model's context of 256 tokens" in "".join(out)
    assert [t["content"] for t in turns if t["role"] == "user"] == ["床前明月光"]


@pytest.fixture
def export_with_settings(chat_model, tmp_path):
    from transformers import GenerationConfig

    folder = tmp_path / "export"
    shutil.copytree(chat_model, folder)
    GenerationConfig(do_sample=True, temperature=0.3, top_k=7, top_p=0.5, repetition_penalty=1.3,
                     max_new_tokens=3).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("extra, want", [
    ([], {"temperature": 0.3, "top_k": 7, "top_p": 0.5, "repetition_penalty": 1.3, "max_new_tokens": 3}),
    (["--sample.temperature=0.9"], {"temperature": 0.9, "top_k": 7, "max_new_tokens": 3}),
    ("config", {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 5}),
])
def test_generate_without_config_samples_as_the_export_says(export_with_settings, tmp_path, capsys, monkeypatch,
                                                             extra, want):
    import trainer.evaluation.generate as gen

    used = []
    real = gen.sample
    monkeypatch.setattr(gen, "sample", lambda model, tok, prompts, s, **kw: used.append(s) or real(model, tok, prompts,
                                                                                                  s, **kw))
    if extra == "config":
        config = tmp_path / "c.yaml"
        config.write_text("sample:\n  max_new_tokens: 5\n", encoding="utf-8")
        extra = ["--config", str(config)]
    code, _, err = cli_exit(capsys, "generate", "--checkpoint", str(export_with_settings), "--prompt", "床前", *extra)
    assert code == 0, err
    assert {k: getattr(used[0], k) for k in want} == want
