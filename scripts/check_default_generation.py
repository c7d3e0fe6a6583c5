#!/usr/bin/env python3
"""Does an export parrot under plain `model.generate(**inputs, max_new_tokens=N)`, with no other
argument (its generation_config.json decides)? Prints, per prompt, the repeated-4-gram fraction
of the continuation (trainer.evaluation.evaluate.repeated_ngram_fraction), and the mean, as JSON.

    python scripts/check_default_generation.py <export folder> [--max_new_tokens 120] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import SampleConfig
    from trainer.evaluation.evaluate import repeated_ngram_fraction

    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("--max_new_tokens", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.export)
    model = AutoModelForCausalLM.from_pretrained(args.export).to(device).eval()
    rows = []
    for prompt in SampleConfig().prompts:
        inputs = tok(prompt, return_tensors="pt").to(device)
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens)
            text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            rows.append({"prompt": prompt, "seed": seed, "repeated_4gram_fraction": repeated_ngram_fraction(text, 4),
                         "text": text})
    mean = sum(r["repeated_4gram_fraction"] for r in rows) / len(rows)
    print(json.dumps({"export": args.export, "max_new_tokens": args.max_new_tokens,
                      "do_sample": model.generation_config.do_sample, "mean_repeated_4gram_fraction": mean,
                      "samples": rows}, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
