"""`chat`: talk to a model in the terminal, each reply streamed as it is generated.

Keeps the conversation (an optional system prompt, then user and assistant turns), renders it with
the tokenizer's chat template every turn, and ends a reply at <|im_end|> or end of text. When the
conversation outgrows the model's context, the oldest exchanges are dropped (and it says so).
Reads lines from stdin, so it also runs piped: `printf '你好\\n/exit\\n' | entrypoint.py chat ...`.
Commands: /reset forgets the conversation, /exit (or the end of the input) quits.
Sampling settings are sample.* (temperature, top_k, top_p, repetition_penalty, max_new_tokens).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, TextIO

import torch

from trainer.config import Config, SampleConfig

HELP = "commands: /reset forgets the conversation, /exit quits"


def _streamer(tok, out: TextIO):
    """A TextStreamer writing to `out` (it prints to stdout) and keeping the reply's text. It holds
    back incomplete characters: a byte-level token can end mid-way through a Han character."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def __init__(self):
            super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
            self.parts: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.parts.append(text)
            out.write(text)
            out.flush()

    return Streamer()


def prompt_ids(tok, turns: list[dict], context: int, room: int) -> tuple[torch.Tensor | None, int]:
    """(prompt token ids, exchanges dropped) leaving `room` tokens to generate within `context`:
    the oldest user/assistant exchanges go first (a system prompt stays). None when even the last
    message alone does not fit. Every message is tokenized as text (encode_chat), as SFT saw it."""
    from trainer.data.conversations import encode_chat

    system = turns[:1] if turns and turns[0]["role"] == "system" else []
    rest = turns[len(system):]
    dropped = 0
    while True:
        ids = torch.tensor([encode_chat(tok, system + rest)])
        if ids.shape[1] + room <= context:
            return ids, dropped
        if len(rest) <= 1:
            return (ids, dropped) if ids.shape[1] < context else (None, dropped)
        rest = rest[2:]
        dropped += 1


@torch.no_grad()
def chat_loop(model, tok, s: SampleConfig, system: str = "", lines: Iterable[str] | None = None,
              out: TextIO | None = None, seed: int = 0) -> list[dict]:
    """Answer each line of `lines` (default: stdin, with a prompt when it is a terminal), writing to
    `out` (default: sys.stdout as it is at the call); returns the conversation as it stands at the
    end. Ctrl-C raises KeyboardInterrupt (entrypoint's `chat` exits 130 on it)."""
    from trainer.data.conversations import stop_token_ids

    out = out or sys.stdout  # looked up now: a default bound at import would miss a replaced stdout
    torch.manual_seed(seed)
    interactive = lines is None and sys.stdin.isatty()
    if lines is None:
        lines = _terminal_lines() if interactive else sys.stdin
    start = [{"role": "system", "content": system}] if system else []
    turns = list(start)
    context = model.config.max_position_embeddings
    stop = stop_token_ids(tok)
    greedy = s.temperature == 0
    out.write(HELP + "\n")
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if not interactive:
            out.write(f"> {text}\n")
        if text == "/exit":
            break
        if text == "/reset":
            turns = list(start)
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text}; {HELP}\n")
            continue
        turns.append({"role": "user", "content": text})
        ids, dropped = prompt_ids(tok, turns, context, s.max_new_tokens)
        if ids is None:
            turns.pop()
            out.write(f"(that message does not fit the model's context of {context} tokens)\n")
            continue
        if dropped:
            start_at = len(start)
            turns = start + turns[start_at + 2 * dropped:]
            out.write(f"(dropped the oldest {dropped} exchange(s) to fit the context of {context} tokens)\n")
        streamer = _streamer(tok, out)
        ids = ids.to(model.device)
        model.generate(
            ids, attention_mask=torch.ones_like(ids), streamer=streamer,
            max_new_tokens=min(s.max_new_tokens, context - ids.shape[1]), do_sample=not greedy,
            temperature=None if greedy else s.temperature, top_k=None if greedy or not s.top_k else s.top_k,
            top_p=None if greedy else s.top_p, repetition_penalty=s.repetition_penalty,
            eos_token_id=stop, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0],
        )
        out.write("\n")
        out.flush()
        turns.append({"role": "assistant", "content": "".join(streamer.parts).strip()})
    return turns


def _terminal_lines():
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return


def chat_cli(folder: Path, system: str, cfg: Config, lines: Iterable[str] | None = None,
             export_settings_kept: frozenset[str] | None = None) -> list[dict]:
    """`entrypoint.py chat`: load the model in the local Hugging Face folder `folder` (what
    entrypoint's `--checkpoint` resolver gives: an export, or a checkpoint made loadable) and chat on
    the terminal, or over `lines`. export_settings_kept: None samples by cfg.sample; else by the
    model's generation_config.json except these sample.* fields (generate.export_sample_config).
    Returns the conversation; Ctrl-C raises KeyboardInterrupt."""
    from trainer.data.conversations import load_chat_tokenizer
    from trainer.evaluation.generate import export_sample_config, load_for_generation

    model, _ = load_for_generation(str(folder), cfg)
    s = cfg.sample if export_settings_kept is None else export_sample_config(model, cfg.sample, export_settings_kept)
    return chat_loop(model, load_chat_tokenizer(folder), s, system=system, lines=lines)
