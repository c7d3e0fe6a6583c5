"""Hugging Face `datasets` as corpus sources: what kind of source a path is, and its rows.

Three kinds, each read as its `train` split:
  saved  a folder written by `Dataset.save_to_disk` (state.json + dataset_info.json + *.arrow) or
         `DatasetDict.save_to_disk` (dataset_dict.json + one folder per split); memory-mapped by
         `datasets.load_from_disk`, nothing copied;
  repo   a local copy of a Hub dataset repository: a folder with a `data/` subfolder or a README.md
         whose YAML header declares `configs` or `dataset_info` (the Hub's dataset card);
  hub    `hf://datasets/<owner>/<name>[@<revision>][/<config>]`, for machines that reach the Hub.
A repo and a hub source are the same call, `datasets.load_dataset(location, config, split="train",
streaming=True)`, with a folder or a Hub id as the location: files are streamed, never converted
into the `datasets` cache. The Hub's commit (resolved once by `hub_revision`) pins what is read.

This module knows `datasets`, not the corpus reader: trainer/data/readers.py turns its errors into DataError
(exit 2) and reads the rows with the same checks and counts as file records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HUB_PREFIX = "hf://datasets/"
SPLIT = "train"
BATCH_ROWS = 1024  # rows converted to Python at a time


class DatasetSourceError(ValueError):
    """A datasets source that cannot be read as named (retrying cannot help); the message names it."""


class MissingColumn(DatasetSourceError):
    """The split has no such column; `columns` lists those it has."""

    def __init__(self, source: str, column: str, columns: list[str]):
        super().__init__(f"{source}: no column '{column}'; columns: {columns}")
        self.column, self.columns = column, columns


@dataclass(frozen=True)
class DatasetSource:
    url: str  # as the corpus listing names it: an absolute folder path or hf://datasets/...
    layout: str  # "saved", "repo" or "hub"
    location: str  # what `datasets` opens: the folder, or the Hub id "<owner>/<name>"
    config: str | None = None  # the repository's config (subset) name; None = its default
    revision: str | None = None  # hub: the commit sha read


def folder_layout(path: Path) -> str | None:
    """'saved' or 'repo' for a folder that `datasets` reads (see the module docstring), else None
    (a plain folder of corpus files, read file by file)."""
    if (path / "dataset_dict.json").is_file() or (
            (path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        return "saved"
    if (path / "data").is_dir() or card_declares_data(path / "README.md"):
        return "repo"
    return None


def card_declares_data(readme: Path) -> bool:
    """True when `readme` starts with a YAML header (between '---' lines) holding `configs` or
    `dataset_info`: the Hub's way of saying which files make which config and split."""
    import yaml

    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    header = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(header)
    except yaml.YAMLError:
        return False
    return isinstance(meta, dict) and bool({"configs", "dataset_info"} & set(meta))


def parse_hub_id(source: str) -> tuple[str, str | None, str | None]:
    """('<owner>/<name>', revision or None, config or None) of 'hf://datasets/<owner>/<name>[@<rev>][/<config>]'.
    Raises DatasetSourceError for any other shape."""
    parts = source[len(HUB_PREFIX):].strip("/").split("/") if source.startswith(HUB_PREFIX) else []
    if len(parts) not in (2, 3) or not all(parts):
        raise DatasetSourceError(f"{source!r}: a Hub dataset is hf://datasets/<owner>/<name>[@<revision>][/<config>]")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, parts[2] if len(parts) == 3 else None


def hub_revision(source: str, repo_id: str, revision: str | None) -> str:
    """The commit sha of `repo_id` at `revision` (None: the default branch), asked of the Hub.

    Raises DatasetSourceError (one line naming `source`) when the dataset or revision does not exist
    or is gated, or when this machine could not reach the Hub (offline, HF_HUB_OFFLINE=1, no DNS).
    An HTTP error answered by the Hub itself (a 5xx) propagates: retrying may help."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return HfApi().dataset_info(repo_id, revision=revision).sha
    except GatedRepoError:
        raise DatasetSourceError(f"{source}: the dataset is gated; accept its terms on the Hub and set "
                                 f"HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise DatasetSourceError(f"{source}: no such dataset on the Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise DatasetSourceError(f"{source}: the dataset has no revision {revision!r}") from None
    except HfHubHTTPError:
        raise
    except Exception as e:  # no HTTP answer at all: DNS, refused connection, timeout, offline mode
        detail = " ".join(str(e).split())[:200]
        raise DatasetSourceError(f"{source}: this machine could not reach the Hub ({constants.ENDPOINT}: "
                                 f"{type(e).__name__}: {detail}); download the dataset on a machine that can "
                                 f"(hf download {repo_id} --repo-type dataset --local-dir DIR) and "
                                 f"name that folder instead") from None


def hub_location(repo_id: str) -> str:
    """What `datasets.load_dataset` opens for a Hub id: the id itself. The one place where the Hub
    path differs from a local repository copy (tests point it at a folder)."""
    return repo_id


def open_split(src: DatasetSource):
    """The `train` split of `src`: a memory-mapped `datasets.Dataset` (saved), None for a saved
    split without rows (datasets 5 cannot load one: IndexError), or a streaming
    `datasets.IterableDataset` (repo, hub). Raises DatasetSourceError naming the source when the
    folder is not readable by `datasets` or has no train split (the message lists the splits);
    a network error while opening a Hub dataset (OSError) propagates: retrying may help."""
    import datasets

    try:
        if src.layout == "saved":
            folder = Path(src.location)
            if (folder / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: a Dataset folder per split
                splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
                if SPLIT not in splits:
                    raise DatasetSourceError(f"{src.url}: a DatasetDict without a '{SPLIT}' split (splits: "
                                             f"{sorted(splits)}); save the split to train on as its own Dataset "
                                             f"or name it '{SPLIT}'")
                folder = folder / SPLIT
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            return datasets.load_from_disk(str(folder)) if state.get("_data_files") else None
        location = hub_location(src.location) if src.layout == "hub" else src.location
        return datasets.load_dataset(location, src.config, split=SPLIT, streaming=True, revision=src.revision)
    except DatasetSourceError:
        raise
    except (ValueError, KeyError, datasets.exceptions.DatasetsError) as e:
        raise DatasetSourceError(f"{src.url}: `datasets` cannot read the {SPLIT} split ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:300]})") from None
    except OSError as e:  # a local folder: missing or unreadable files; from the Hub: the network (retry)
        if src.layout == "hub":
            raise
        detail = " ".join(str(e).split())[:300]
        raise DatasetSourceError(f"{src.url}: `datasets` cannot read the {SPLIT} split ({type(e).__name__}: "
                                 f"{detail})") from None


def iter_column(src: DatasetSource, column: str) -> Iterator[tuple[int, object]]:
    """(row index in the train split, value of `column`) of every row, in order, as Python
    objects (str for a string column; list of dicts for a messages column; None where a streamed
    JSON record lacks the key). Raises MissingColumn when the split's known columns lack `column`,
    DatasetSourceError as open_split does."""
    ds = open_split(src)
    if ds is None:
        return
    names = ds.column_names  # None for a streamed folder whose features are not known in advance
    if names is not None:
        if column not in names:
            raise MissingColumn(src.url, column, list(names))
        ds = ds.select_columns([column])
    index = 0
    for batch in ds.iter(batch_size=BATCH_ROWS):
        values = batch.get(column) or [None] * len(next(iter(batch.values()), []))
        for value in values:
            yield index, value
            index += 1
