"""Exports that llama.cpp runs (issue 16): an export whose tokenizer was trained with
tokenizer.pre_tokenizer=qwen2 converts with llama.cpp's own convert_hf_to_gguf.py (through
scripts/convert_to_gguf.py, which names the pre-tokenizer the converter's hash table cannot know),
llama.cpp tokenizes text to the same ids as transformers, and its greedy generation is byte for
byte the text transformers' greedy generation gives. A `zh` export is refused, with the fix.

llama.cpp comes from the llama-cpp-python sdist on PyPI (vendor/llama.cpp: the converter, its gguf
package, and the C++ sources of llama-simple and llama-tokenize, built here for the CPU). The
download (50 MB) and build (about 2-4 minutes on 2 cores) happen once and are kept under
.venv/llama.cpp-<version>/; the slow test runs in CI.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from trainer.data.tokenizer import EOS, load_tokenizer, save_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.16"  # its vendor/llama.cpp is the converter and the runtime tested here
CACHE = ROOT / ".venv" / f"llama.cpp-{LLAMA_CPP_PYTHON}"
TARGETS = ("llama-simple", "llama-tokenize")
# Han, Latin with spaces and an apostrophe, digits, full-width and ASCII punctuation, newlines.
TEXTS = ["床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。", "Hello world, it's 2024!", "春眠不覺曉  \n\n處處聞啼鳥"]
PROMPT = "春眠不覺曉，"
NEW_TOKENS = 16


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=timeout)
    assert done.returncode == 0, (cmd, done.stdout[-3000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, with build/bin/llama-simple and
    llama-tokenize built for the CPU (GGML_NATIVE off: the same binary on any x86-64). A stamp file
    marks a finished build; a lock keeps two test runs from building at once."""
    src, stamp = CACHE / "llama.cpp", CACHE / ".built"
    CACHE.parent.mkdir(exist_ok=True)
    with open(CACHE.parent / f"{CACHE.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and all((src / "build" / "bin" / t).is_file() for t in TARGETS):
            return src
        shutil.rmtree(CACHE, ignore_errors=True)
        CACHE.mkdir()
        run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(CACHE)])
        sdist = next(CACHE.glob("llama_cpp_python-*.tar.gz"))
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = "llama.cpp/" + m.name[len(prefix):]
            tar.extractall(CACHE, members=members, filter="data")
        sdist.unlink()
        run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF"], cwd=src)
        run(["cmake", "--build", "build", "--target", *TARGETS, f"-j{os.cpu_count() or 2}"], cwd=src, timeout=3000)
        stamp.write_text(LLAMA_CPP_PYTHON)
    return src


def tiny_export(root: Path, docs: list[str], pre_tokenizer: str, train_steps: int) -> Path:
    """root/final: a tiny Llama written by checkpoint.save (what an export copies), with a tokenizer
    trained with `pre_tokenizer`, after `train_steps` AdamW steps on `docs` (so that greedy decoding
    follows learnt, not random, logits)."""
    import torch

    from trainer.model.llama import build_model, llama_config
    from trainer.state import checkpoint

    save_tokenizer(train_tokenizer(docs, 512, 4, pre_tokenizer=pre_tokenizer), root / "run-tokenizer")
    tok = load_tokenizer(root / "run-tokenizer")
    torch.manual_seed(0)
    model = build_model(llama_config("tiny", len(tok), 128, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id), "sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor([i for d in docs for i in tok(d + EOS).input_ids])
    seq = 64
    batches = ids[: len(ids) // seq * seq].view(-1, seq)
    for step in range(train_steps):
        batch = batches[torch.randint(len(batches), (16,), generator=torch.Generator().manual_seed(step))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.generation_config.do_sample = False
    checkpoint.save(root / "final", model, tok, optimizer, {"step": train_steps}, "", [])
    return root / "final"


def convert(export: Path, llama_cpp: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_to_gguf.py"), str(export),
                           "--llama-cpp", str(llama_cpp), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, timeout=600)


def test_a_zh_export_is_refused_with_the_fix(tmp_path, tiny_docs):
    save_tokenizer(train_tokenizer(tiny_docs[:100], 300, 4, pre_tokenizer="zh"), tmp_path / "final")
    done = convert(tmp_path / "final", tmp_path / "no-llama.cpp", tmp_path / "m.gguf")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "tokenizer.pre_tokenizer=qwen2" in done.stderr and not (tmp_path / "m.gguf").exists()


def llama_tokenize(llama_cpp: Path, gguf: Path, text: str) -> list[int]:
    done = run([str(llama_cpp / "build" / "bin" / "llama-tokenize"), "-m", str(gguf), "-p", text, "--ids",
                "--no-bos", "--log-disable"])
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def byte_of_symbol() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what `tokenizers`' ByteLevel writes tokens in), symbol -> byte:
    printable bytes stand for themselves, the other 68 for chr(256 + k) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


def token_bytes(tok, ids: list[int]) -> bytes:
    """The bytes of byte-level BPE tokens, whole or partial characters alike."""
    to_byte = byte_of_symbol()
    return b"".join(bytes(to_byte[c] for c in tok.convert_ids_to_tokens(i)) for i in ids)


@pytest.mark.slow
def test_llama_cpp_runs_a_qwen2_export_like_transformers(tmp_path, tiny_docs, llama_cpp):
    import torch
    from transformers import AutoModelForCausalLM

    export = tiny_export(tmp_path, tiny_docs, "qwen2", train_steps=60)
    tok = load_tokenizer(export)

    # The converter as shipped cannot name the pre-tokenizer of a vocabulary it has not seen.
    probe = ("import sys, pathlib; sys.path.insert(0, sys.argv[3]); import convert_to_gguf as c\n"
             "from transformers import AutoTokenizer\n"
             "conv = c.import_converter(pathlib.Path(sys.argv[1]))\n"
             "try:\n    conv.TextModel.get_vocab_base_pre(None, AutoTokenizer.from_pretrained(sys.argv[2]))\n"
             "except NotImplementedError as e:\n    print('refused:', e)")
    done = run([sys.executable, "-c", probe, str(llama_cpp), str(export), str(ROOT / "scripts")])
    assert b"refused: BPE pre-tokenizer was not recognized" in done.stdout

    gguf_path = tmp_path / "model.gguf"
    done = convert(export, llama_cpp, gguf_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.remove(str(llama_cpp / "gguf-py"))
    reader = gguf.GGUFReader(gguf_path)
    field = reader.get_field("tokenizer.ggml.pre")
    assert bytes(field.parts[-1]).decode() == "qwen2"
    assert int(reader.get_field("tokenizer.ggml.eos_token_id").parts[-1][0]) == tok.eos_token_id

    for text in TEXTS:  # llama.cpp's qwen2 split and merges give transformers' ids
        assert llama_tokenize(llama_cpp, gguf_path, text) == tok(text, add_special_tokens=False).input_ids, text

    model = AutoModelForCausalLM.from_pretrained(export)
    prompt = tok(PROMPT, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = [i for i in out[0, prompt.input_ids.shape[1]:].tolist()]
    if tok.eos_token_id in new:  # llama-simple stops at the end-of-generation token without printing it
        new = new[: new.index(tok.eos_token_id)]
    assert new, "the model ended at once: nothing to compare"
    done = run([str(llama_cpp / "build" / "bin" / "llama-simple"), "-m", str(gguf_path), "-n", str(NEW_TOKENS),
                PROMPT])
    assert done.stdout == PROMPT.encode() + token_bytes(tok, new) + b"\n"
