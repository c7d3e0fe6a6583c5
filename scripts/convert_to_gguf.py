#!/usr/bin/env python3
"""Convert an export (a Hugging Face model folder) to GGUF with llama.cpp's own converter.

    python scripts/convert_to_gguf.py runs/<id>/final --llama-cpp path/to/llama.cpp --outfile model.gguf
    python scripts/convert_to_gguf.py ... --outtype f32          # any further flags go to the converter

Why a wrapper: `convert_hf_to_gguf.py` names a BPE tokenizer's pre-tokenizer (the GGUF key
`tokenizer.ggml.pre`, which selects the split regex llama.cpp applies) in
`TextModel.get_vocab_base_pre`, by hashing the token ids that the tokenizer gives a fixed test
string and looking the hash up in a table of published models; an unknown hash raises
NotImplementedError("BPE pre-tokenizer was not recognized"). The ids depend on the vocabulary, so a
tokenizer we train never matches, even one with Qwen2's exact split; the converter has no flag to
name the pre-tokenizer (its update script, convert_hf_to_gguf_update.py, adds hashes of models it
downloads from the Hugging Face Hub). This script runs the converter unchanged except for that one
lookup: when the table does not know the tokenizer, the name comes from tokenizer.json's
pre_tokenizer (trainer.data.tokenizer.llama_cpp_pre_name: it must be exactly a split llama.cpp
implements, i.e. tokenizer.pre_tokenizer qwen2, deepseek-llm or gpt-2). A `zh` tokenizer is refused
(exit 2): llama.cpp would split text differently from the tokenizer the model was trained with.

The converter imports `mistral_common` at the top (for Mistral models only); when it is not
installed an empty stand-in is used, since a Llama export never reaches that code.
Exit codes: 0 converted, 2 the tokenizer cannot be converted faithfully, 1 the converter failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MISTRAL_COMMON_NAMES = {  # module -> names convert_hf_to_gguf.py imports from it at the top
    "mistral_common.tokens.tokenizers.base": ("TokenizerVersion",),
    "mistral_common.tokens.tokenizers.multimodal": ("DATASET_MEAN", "DATASET_STD"),
    "mistral_common.tokens.tokenizers.tekken": ("Tekkenizer",),
    "mistral_common.tokens.tokenizers.sentencepiece": ("SentencePieceTokenizer",),
}


def pre_name_of(model_dir: Path) -> str:
    """llama.cpp's pre-tokenizer name for the export's tokenizer.json; ValueError naming the fix
    when llama.cpp has no such split, FileNotFoundError when there is no tokenizer.json."""
    from trainer.data.tokenizer import llama_cpp_pre_name

    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    name = llama_cpp_pre_name(tokenizer_json)
    if name is None:
        raise ValueError(f"{model_dir}/tokenizer.json: its pre-tokenizer is not one llama.cpp implements "
                         "(tokenizer.pre_tokenizer=zh, or another project's split), so llama.cpp would split text "
                         "differently from training. Train the tokenizer with tokenizer.pre_tokenizer=qwen2 "
                         "(or deepseek-llm, gpt-2) to export to GGUF.")
    return name


def stub_mistral_common() -> None:
    """Empty stand-ins for the mistral_common names the converter imports, when it is not installed."""
    try:
        import mistral_common  # noqa: F401
        return
    except ImportError:
        pass
    import transformers  # noqa: F401 - before the stand-ins: it probes for mistral_common by import spec
    for name in ("mistral_common", "mistral_common.tokens", "mistral_common.tokens.tokenizers"):
        sys.modules[name] = types.ModuleType(name)
    for name, attrs in MISTRAL_COMMON_NAMES.items():
        module = types.ModuleType(name)
        for attr in attrs:
            setattr(module, attr, None)
        sys.modules[name] = module


def import_converter(llama_cpp: Path):
    """convert_hf_to_gguf as a module, with the gguf package of the same llama.cpp checkout."""
    if not (llama_cpp / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"--llama-cpp {llama_cpp}: no convert_hf_to_gguf.py there")
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    stub_mistral_common()
    import convert_hf_to_gguf

    return convert_hf_to_gguf


def name_pre_tokenizer(converter, pre_name: str) -> None:
    """Make the converter's lookup fall back to `pre_name` for a tokenizer its table does not know
    (its own answer wins for a published one, e.g. a Qwen2 tokenizer loaded by tokenizer.path)."""
    lookup = converter.TextModel.get_vocab_base_pre
    quiet = logging.getLogger("hf-to-gguf")

    def get_vocab_base_pre(self, tokenizer) -> str:
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its "not recognized" banner is expected here
        try:
            return lookup(self, tokenizer)
        except NotImplementedError:
            logging.getLogger(__name__).info(f"tokenizer.ggml.pre = {pre_name!r} (from tokenizer.json)")
            return pre_name
        finally:
            quiet.setLevel(level)

    converter.TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="the export: a Hugging Face model folder")
    p.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp source tree (convert_hf_to_gguf.py)")
    args, rest = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        pre_name = pre_name_of(args.model_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    converter = import_converter(args.llama_cpp)
    name_pre_tokenizer(converter, pre_name)
    sys.argv = ["convert_hf_to_gguf.py", str(args.model_dir), *rest]
    converter.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
