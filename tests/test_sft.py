"""SFT on CPU: conversation checks, the reply mask, packing, the masked loss against a computation by
hand, resume after SIGTERM by equality, the stage on both backends, chat, and the full path
pretrain -> sft -> chat through the CLI."""

import json
import os
import signal
import subprocess

import numpy as np
import pytest
import torch

from faults import chat_model, sft_config  # noqa: F401 - fixtures
from trainer.config import load_config
from trainer.data.conversations import (
    IGNORE,
    conversation_problem,
    encode_conversations,
    load_chat_tokenizer,
    pack,
    prepare_conversations,
    render_pieces,
    stop_token_ids,
)
from trainer.data.sources import DataError
from trainer.io.storage import open_storage
from trainer.job.stages import stage_sft
from trainer.state import checkpoint as ckpt
from trainer.state import protocol
from trainer.training.tasks import PackedLoss, sft_attention
from trainer.training.worker import sft_worker

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sft-sample" / "poetry-chat.jsonl"


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


CONVERSATIONS = [
    [U("床前明月光"), A("疑是地上霜")],
    [S("你是詩人"), U("春眠不覺曉"), A("處處聞啼鳥"), U("下一句"), A("夜來風雨聲")],
    [U("白日依山盡"), A("黃河入海流")],
]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


# Checks on conversations ------------------------------------------------------------------------

@pytest.mark.parametrize("turns, reason, detail", [
    ([], "not a conversation", "non-empty list"),
    ("床前明月光", "not a conversation", "non-empty list"),
    ([U("a"), "b"], "not a conversation", "turn 2 is str"),
    ([{"content": "a"}, A("b")], "missing role", "turn 1 has no role"),
    ([{"role": "bot", "content": "a"}], "unknown role", "turn 1 has role 'bot'"),
    ([U("a"), A("  ")], "empty content", "turn 2 (assistant) has empty"),
    ([U("a"), {"role": "assistant"}], "empty content", "turn 2 (assistant) has empty or missing"),
    ([A("a"), U("b")], "wrong order", "turn 1: assistant before any user turn"),
    ([S("s"), A("a")], "wrong order", "turn 2: assistant before any user turn"),
    ([U("a"), U("b"), A("c")], "wrong order", "turn 2: two user turns in a row"),
    ([U("a"), A("b"), A("c")], "wrong order", "turn 3: two assistant turns in a row"),
    ([U("a"), S("s"), A("b")], "wrong order", "turn 2 is a system turn"),
    ([U("a"), A("b"), U("c")], "no reply", "does not end with an assistant turn"),
    ([S("s")], "no reply", "does not end with an assistant turn"),
])
def test_conversation_problems_by_hand(turns, reason, detail):
    got = conversation_problem(turns)
    assert got is not None and got[0] == reason and detail in got[1], got


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_good_conversations_pass(turns):
    assert conversation_problem(turns) is None


# The reply mask -----------------------------------------------------------------------------------

def test_reply_tokens_are_exactly_the_assistant_turns(chat_model):
    tok = load_chat_tokenizer(chat_model)
    turns = CONVERSATIONS[1]
    pieces = render_pieces(tok, turns)
    assert "".join(p for p, _ in pieces) == tok.apply_chat_template(turns, tokenize=False)
    assert [p for p, reply in pieces if reply] == ["處處聞啼鳥<|im_end|>\n", "夜來風雨聲<|im_end|>\n"]
    [(tokens, reply)] = encode_conversations(tok, [turns])
    assert len(tokens) == len(reply)
    assert tok.decode(tokens) == tok.apply_chat_template(turns, tokenize=False)
    assert tok.decode([t for t, r in zip(tokens, reply) if r]) == "處處聞啼鳥<|im_end|>\n夜來風雨聲<|im_end|>\n"
    # What `chat` feeds the model before the second reply is exactly the tokens training saw there.
    prompt = tok.apply_chat_template(turns[:4], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert tokens[:len(ids)] == ids and reply[len(ids)] and not reply[len(ids) - 1]


# Packing ------------------------------------------------------------------------------------------

def test_pack_by_hand():
    F_, T_ = False, True
    convs = [([1, 2, 3], [F_, T_, T_]), ([4, 5], [F_, T_]), ([6, 7, 8, 9], [F_, F_, T_, T_]), ([10], [T_])]
    rows = list(pack(iter(convs), seq_len=5, pad_id=0))  # rows of 6 tokens; first fit
    assert len(rows) == 2
    assert rows[0][:, 0].tolist() == [1, 2, 3, 4, 5, 10]  # [10] fills the gap in the first row
    assert rows[0][:, 1].tolist() == [IGNORE, 2, 3, IGNORE, 5, 10]
    assert rows[0][:, 2].tolist() == [0, 1, 2, 0, 1, 0]  # positions restart per conversation
    assert rows[1][:, 0].tolist() == [6, 7, 8, 9, 0, 0]
    assert rows[1][:, 1].tolist() == [IGNORE, IGNORE, 8, 9, IGNORE, IGNORE]
    assert rows[1][:, 2].tolist() == [0, 1, 2, 3, 0, 1]  # padding is a "conversation" of its own
    next_fit = list(pack(iter(convs), seq_len=5, pad_id=0, open_rows=1))
    assert [r[:, 0].tolist() for r in next_fit] == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0]]


def reply_loss_alone(model, encoded) -> tuple[float, int]:
    """Cross-entropy summed over reply tokens only, each conversation run by itself (float64)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for tokens, reply in encoded:
            ids = torch.tensor([tokens], device=model.device)
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
            for p in range(len(tokens) - 1):
                if reply[p + 1]:  # only reply tokens are targets
                    total -= logprobs[p, tokens[p + 1]].item()
                    n += 1
    return total, n


def packed_batch(tok) -> tuple[list, np.ndarray, torch.Tensor]:
    encoded = encode_conversations(tok, CONVERSATIONS)
    [row] = list(pack(iter(encoded), seq_len=200, pad_id=tok.pad_token_id))
    return encoded, row, torch.from_numpy(row.astype(np.int64))[None]


def without_positions(batch):
    """The packed rows with positions 0..T (one sequence), as if the conversations were one text."""
    out = batch.clone()
    out[..., 2] = torch.arange(batch.shape[1], device=batch.device)
    return out


def test_packed_loss_is_the_sum_over_replies_of_each_conversation_alone(chat_model):
    """The masked loss over a packed row equals cross-entropy over the reply tokens only, each
    conversation run by itself: prompt tokens contribute nothing, and packed conversations do not
    see each other (block-diagonal attention from the restarting positions)."""
    from transformers import AutoModelForCausalLM

    encoded, row, batch = packed_batch(load_chat_tokenizer(chat_model))
    model = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32,
                                                 attn_implementation=sft_attention("auto", "cpu")).eval()
    with torch.no_grad():
        packed = PackedLoss(model)(batch)
        # Without the restarting positions the conversations would attend to each other.
        unpacked = PackedLoss(model)(without_positions(batch))
    by_hand, n_replies = reply_loss_alone(model, encoded)
    assert n_replies == sum(sum(r) for _, r in encoded) == int((row[1:, 1] != IGNORE).sum())
    assert packed.item() == pytest.approx(by_hand, rel=1e-5)
    assert unpacked.item() != pytest.approx(by_hand, rel=1e-2)  # so the test can fail


@pytest.mark.gpu
def test_packed_loss_on_gpu_compiled(chat_model):
    """The GPU training path (the attention sft picks, torch.compile) keeps packed conversations
    apart too: exactly in fp32, and to bf16 precision under autocast."""
    from transformers import AutoModelForCausalLM

    encoded, row, batch = packed_batch(load_chat_tokenizer(chat_model))
    model = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32,
                                                 attn_implementation=sft_attention("auto", "cuda")).cuda().eval()
    batch = batch.cuda()
    compiled = torch.compile(PackedLoss(model))
    by_hand, _ = reply_loss_alone(model, encoded)
    with torch.no_grad():
        packed = compiled(batch)
        unpacked = compiled(without_positions(batch))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            packed_bf16 = compiled(batch)
    assert packed.item() == pytest.approx(by_hand, rel=1e-4)  # TF32 matmuls at most
    assert unpacked.item() != pytest.approx(by_hand, rel=1e-2)
    assert packed_bf16.item() == pytest.approx(by_hand, rel=2e-2)


@pytest.mark.gpu
def test_finetune_on_gpu(tmp_path, chat_model, single_process):
    """The defaults on a GPU: bf16 autocast, torch.compile, fused AdamW, pinned batches."""
    cfg = sft_config(tmp_path, chat_model, [SAMPLE], **{"train.device": "auto", "train.compile": "auto",
                                                        "sft.max_steps": 6})
    store = open_storage(cfg.storage.bucket)
    data_dir = prepare_conversations(cfg, load_chat_tokenizer(chat_model), 256)
    sft_worker(cfg, data_dir, chat_model)
    rows = [json.loads(line) for line in store.read_text("runs/base-sft/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["loss"] < rows[0]["loss"]
    assert protocol.complete_steps(store, "base-sft")[0] == 6


# Bad records --------------------------------------------------------------------------------------

BAD = [
    ({"messages": [A("疑是地上霜"), U("床前明月光")]}, "wrong order", "turn 1: assistant before any user turn"),
    ({"messages": [U("a"), U("b"), A("c")]}, "wrong order", "turn 2: two user turns in a row"),
    ({"messages": [U("床前明月光"), A("")]}, "empty content", "turn 2 (assistant) has empty or missing content"),
    ({"messages": [{"content": "床前明月光"}, A("疑是地上霜")]}, "missing role", "turn 1 has no role"),
    ({"messages": [U("床前明月光")]}, "no reply", "does not end with an assistant turn"),
    ({"text": "床前明月光"}, "missing messages field", "record has no 'messages' field"),
    ('{"messages": [', "invalid JSON", "invalid JSON"),
    ({"messages": [U("床前明月光"), A("疑是地上霜" * 60)]}, "over-long conversation",
     "more than sft.seq_len + 1 = 257"),
]


@pytest.mark.parametrize("record, reason, detail", BAD, ids=[b[1] for b in BAD])
def test_bad_record_fails_naming_file_and_line(tmp_path, chat_model, record, reason, detail):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}, record])
    cfg = sft_config(tmp_path, chat_model, [path])
    with pytest.raises(DataError) as e:
        prepare_conversations(cfg, load_chat_tokenizer(chat_model), 256)
    assert f"{path}:2: " in str(e.value) and detail in str(e.value) and "data.on_error=skip" in str(e.value)


def test_bad_records_are_skipped_and_counted(tmp_path, chat_model):
    good = [{"messages": c} for c in CONVERSATIONS]
    path = write_jsonl(tmp_path / "chat.jsonl", good[:1] + [b[0] for b in BAD] + good[1:])
    cfg = sft_config(tmp_path, chat_model, [path], **{"data.on_error": "skip"})
    data_dir = prepare_conversations(cfg, load_chat_tokenizer(chat_model), 256)
    index = json.loads((data_dir / "index.json").read_text())
    assert index["conversations"] == 3
    assert index["skipped_records"] == {"wrong order": 2, "empty content": 1, "missing role": 1, "no reply": 1,
                                        "missing messages field": 1, "invalid JSON": 1, "over-long conversation": 1}
    assert index["rows"] == 1 and index["seq_len"] == 256


def test_parquet_conversations_as_smoltalk_ships_them(tmp_path, chat_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": c, "source": "hand"} for c in CONVERSATIONS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000.parquet")
    cfg = sft_config(tmp_path, chat_model, [tmp_path])
    index = json.loads((prepare_conversations(cfg, load_chat_tokenizer(chat_model), 256)
                        / "index.json").read_text())
    assert index["conversations"] == 3 and index["skipped_records"] == {}
    bad = rows[:1] + [{"messages": [A("疑是地上霜"), U("床前明月光")], "source": "hand"}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "train-00000.parquet")
    with pytest.raises(DataError, match=r"train-00000.parquet:row 2: turn 1: assistant before any user turn"):
        prepare_conversations(cfg, load_chat_tokenizer(chat_model), 256)


# Training: resume after SIGTERM equals a straight run --------------------------------------------

def test_resume_after_sigterm_equals_straight_run(tmp_path, chat_model, single_process, monkeypatch):
    from safetensors.torch import load_file

    import trainer.training.loop

    def run(root, stop_at=None):
        cfg = sft_config(root, chat_model, [SAMPLE], **{"sft.checkpoint_every_steps": 100})
        store = open_storage(cfg.storage.bucket)
        data_dir = prepare_conversations(cfg, load_chat_tokenizer(chat_model), 256)
        if stop_at is not None:  # SIGTERM while step `stop_at` runs, as a preempting host sends it
            real = trainer.training.loop.lr_at

            def lr_at(step, t, max_steps=None):
                if step == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return real(step, t, max_steps)

            monkeypatch.setattr(trainer.training.loop, "lr_at", lr_at)
            with pytest.raises(SystemExit) as e:
                sft_worker(cfg, data_dir, chat_model)
            assert e.value.code == 75
            monkeypatch.setattr(trainer.model.schedule, "lr_at", real)
            assert protocol.complete_steps(store, "base-sft") == [stop_at + 1]  # it finished the step, then saved
        sft_worker(cfg, data_dir, chat_model)
        rows = [json.loads(line) for line in store.read_text("runs/base-sft/metrics.jsonl").splitlines()]
        return load_file(str(root / "bucket/runs/base-sft/checkpoints/step-00000004/model.safetensors")), rows

    straight, straight_rows = run(tmp_path / "straight")
    resumed, resumed_rows = run(tmp_path / "resumed", stop_at=1)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in straight_rows]
    assert [r["step"] for r in straight_rows] == [1, 2, 3, 4]
    assert straight_rows[-1]["loss"] < straight_rows[0]["loss"]  # it learns the replies
    init = load_file(str(chat_model / "model.safetensors"))
    assert not torch.equal(straight["lm_head.weight"], init["lm_head.weight"])  # it trained


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path, chat_model, single_process, cli):
    """torchrun with 2 CPU processes (gloo): the loss is normalised by the reply tokens of the whole
    step, not per rank or micro-batch, so the result is one process's up to float rounding."""
    from safetensors.torch import load_file

    overrides = {"train.micro_batch_size": 1, "sft.checkpoint_every_steps": 100}
    two = sft_config(tmp_path / "two", chat_model, [SAMPLE], **{**overrides, "train.nproc": 2})
    result = cli.run("sft", cli.write_config(two, tmp_path / "two.yaml"))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "sft: torch.distributed.run --nproc_per_node=2 --standalone ... (1 node(s) x 2 process(es))" in result.stdout
    assert "(1 per micro-batch, 2 accumulation)" in result.stdout
    one = sft_config(tmp_path / "one", chat_model, [SAMPLE], **overrides)
    sft_worker(one, prepare_conversations(one, load_chat_tokenizer(chat_model), 256), chat_model)
    weights = [load_file(str(cfg_root / "bucket/runs/base-sft/checkpoints/step-00000004/model.safetensors"))
               for cfg_root in (tmp_path / "one", tmp_path / "two")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-4) for k in weights[0])  # rounding, grown by Adam
    losses = [[json.loads(line)["loss"] for line in open(cfg_root / "bucket/runs/base-sft/metrics.jsonl")]
              for cfg_root in (tmp_path / "one", tmp_path / "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# The stage, local and S3 ------------------------------------------------------------------------------

def test_stage_sft_from_the_bucket(tmp_path, bucket, chat_model, single_process):
    """Model and conversations in the bucket (local folder or S3): train, checkpoint, export; a
    rerun finds the work done."""
    from transformers import AutoModelForCausalLM

    store = bucket.open()
    store.upload_dir(chat_model, "runs/base/final")
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS * 3])
    store.upload_file(tmp_path / "chat.jsonl", "conversations/chat.jsonl")
    cfg = sft_config(tmp_path, "", [store.url("conversations")], **bucket.overrides())
    assert stage_sft(cfg) == 0
    assert protocol.complete_steps(store, "base-sft") == [4, 2]
    rows = [json.loads(line) for line in store.read_text("runs/base-sft/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    final = tmp_path / "final"
    store.download_dir("runs/base-sft/final", final)
    assert not (final / "optimizer.pt").exists() and (final / protocol.MANIFEST).is_file()
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = load_chat_tokenizer(final)
    assert model.generation_config.eos_token_id == stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"),
                                                                           tok.eos_token_id]
    assert tok.chat_template and model.config.max_position_embeddings == 256
    # The final export is a checkpoint's HF files: chat can start from either.
    assert ckpt.model_dir(store.url("runs/base-sft/checkpoints/step-00000004"), cfg.storage,
                          tmp_path / "cache").joinpath("config.json").is_file()
    assert stage_sft(cfg) == 0  # nothing left to do
    assert protocol.complete_steps(store, "base-sft") == [4, 2]


# Chat ---------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.writes)


def test_chat_keeps_history_resets_and_exits(chat_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    import trainer.job.chat
    from trainer.config import SampleConfig
    from trainer.job.chat import chat_loop

    seen = []
    real = trainer.job.chat.prompt_ids
    monkeypatch.setattr(trainer.job.chat, "prompt_ids",
                        lambda tok, turns, *a: seen.append(list(turns)) or real(tok, turns, *a))
    model = AutoModelForCausalLM.from_pretrained(str(chat_model)).eval()
    tok = load_chat_tokenizer(chat_model)
    out = Recorder()
    turns = chat_loop(model, tok, SampleConfig(max_new_tokens=6, temperature=0), system="你是詩人",
                      lines=["床前明月光", "舉頭望明月", "/reset", "白日依山盡", "/exit", "never answered"], out=out)
    assert [len(t) for t in seen] == [2, 4, 2]  # system + the conversation so far + the new message
    assert [t["role"] for t in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][1]["content"] == "床前明月光" and seen[1][3]["content"] == "舉頭望明月"
    assert [t["role"] for t in turns] == ["system", "user", "assistant"] and turns[1]["content"] == "白日依山盡"
    assert "(conversation cleared)" in out.text and "> /exit" in out.text and "never answered" not in out.text
    assert turns[2]["content"] and turns[2]["content"] in out.text  # the streamed text is the reply kept


def test_chat_drops_the_oldest_exchange_to_fit_the_context(chat_model):
    from trainer.job.chat import prompt_ids

    tok = load_chat_tokenizer(chat_model)
    turns = [S("你是詩人"), U("床前明月光" * 4), A("疑是地上霜" * 4), U("舉頭望明月")]
    full, dropped = prompt_ids(tok, turns, context=1000, room=10)
    assert dropped == 0
    ids, dropped = prompt_ids(tok, turns, context=full.shape[1] + 5, room=10)
    assert dropped == 1 and ids.shape[1] + 10 <= full.shape[1] + 5
    assert tok.decode(ids[0]).startswith("<|im_start|>system\n你是詩人")
    assert prompt_ids(tok, turns[:2], context=5, room=1)[0] is None


# The full path through the CLI ------------------------------------------------------------------

@pytest.mark.slow
def test_pretrain_then_sft_then_chat_through_the_cli(tmp_path, tiny_config, cli):
    cfg = tiny_config(tmp_path, {"sft.sources": [str(SAMPLE)], "sft.seq_len": 256, "sft.batch_sequences": 4,
                                 "sft.max_steps": 3, "sft.warmup_steps": 1, "sft.lr": 0.003,
                                 "sft.checkpoint_every_steps": 2})
    path = cli.write_config(cfg, tmp_path / "tiny.yaml")
    pretrain = cli.run("run", path)
    assert pretrain.returncode == 0, pretrain.stdout[-4000:]
    bucket = cfg.storage.bucket
    sft = cli.run("sft", path)
    assert sft.returncode == 0, sft.stdout[-4000:]
    assert "42 conversations" in sft.stdout and "sft export: step 3 -> " in sft.stdout
    chat = subprocess.run(cli.args("chat", path) + [f"--checkpoint={bucket}/runs/tiny-sft/final"], cwd=ROOT,
                          env=cli.env(), input="床前明月光\n/reset\n白日依山盡\n/exit\n不應回答\n", text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert chat.returncode == 0, chat.stdout[-4000:]
    lines = chat.stdout.splitlines()
    assert "> 床前明月光" in lines and "(conversation cleared)" in lines and "> /exit" in lines
    assert "> 不應回答" not in lines
    # A pretraining checkpoint is a Hugging Face folder too (config and tokenizer inside): no conversion.
    step = f"{bucket}/runs/tiny/checkpoints/step-00000004"
    folder = ckpt.model_dir(step, cfg.storage, tmp_path / "cache")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert load_chat_tokenizer(folder).get_vocab() == load_chat_tokenizer(f"{bucket}/runs/tiny/final").get_vocab()
