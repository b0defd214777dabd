"""A hub data set as --data (`org/name[:config][@split]`): which of its files to read, picked as the `datasets`
library picks them for `load_dataset(name, config, split=split)`, so that a recipe's data set means the same
records here (tests/test_data.py checks the choice against `datasets` itself on several layouts of a repo)."""
from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

from .data import DataError

# The file-name words by which a data set without a `configs:` list in its card names its splits, as the
# `datasets` library reads them: a word counts where no letter touches it (`train-00000.jsonl`, `data/dev.json`,
# not `pretrain.json`). Files named for none of them are all the train split.
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}
NOT_DATA = {"config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json"}  # a repo's own files


def fetch_hub_dataset(spec: str) -> list[Path]:
    """`org/name[:config][@split]` -> the local .json/.jsonl files of that split (train unless named), fetched
    from the hub. They are the files `datasets.load_dataset(name, config, split=split)` reads (`dataset_files`)."""
    from huggingface_hub import snapshot_download

    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        folder = Path(snapshot_download(name, repo_type="dataset", allow_patterns=["*.json", "*.jsonl", "README.md"]))
    except Exception as e:
        raise DataError(f"could not fetch data set {name!r} from the hub ({type(e).__name__}). "
                        "If offline, download it elsewhere and pass the .json/.jsonl file to --data.") from None
    files = dataset_files(folder, config, split or "train", name)
    print(f"data: {spec}: " + ", ".join(p.relative_to(folder).as_posix() for p in files))
    return files


def dataset_files(folder: Path, config: str, split: str, name: str) -> list[Path]:
    """The .json/.jsonl files of a data set's `config` and `split`, in a downloaded copy of its repo.

    As the `datasets` library picks them: where the card (README.md) lists `configs:`, the config named (or the
    default one, or the only one) and its `data_files` for the split (a bare path or list is the train split);
    otherwise the files whose names carry the split's word (SPLIT_WORDS). A config or split that is not there
    is an error that lists those that are, never a quiet fall back to other data."""
    from huggingface_hub import metadata_load

    card = folder / "README.md"
    configs = (metadata_load(card) or {}).get("configs") if card.is_file() else None
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.name != "README.md")
    if configs:
        by_name = {c.get("config_name", "default"): c for c in configs}
        if not config:
            defaults = [n for n, c in by_name.items() if c.get("default") or n == "default"]
            if len(by_name) > 1 and len(defaults) != 1:
                raise DataError(f"data set {name!r} has the configs {', '.join(by_name)}; name one: {name}:CONFIG.")
            config = defaults[0] if defaults else next(iter(by_name))
        if config not in by_name:
            raise DataError(f"data set {name!r} has no config {config!r}; its configs: {', '.join(by_name)}.")
        data_files = by_name[config].get("data_files", [])
        if isinstance(data_files, str) or (data_files and isinstance(data_files[0], str)):
            data_files = [{"split": "train", "path": data_files}]
        splits = {d["split"]: [d["path"]] if isinstance(d["path"], str) else d["path"] for d in data_files}
        if split not in splits:
            raise DataError(f"data set {name!r}, config {config!r}, has no split {split!r}; its splits: "
                            f"{', '.join(splits)}.")
        patterns = splits[split]
        files = [f for f in present if any(fnmatch(f, pattern) for pattern in patterns)]
        where = f"config {config!r}, split {split!r} ({', '.join(patterns)})"
    else:
        if config:
            raise DataError(f"data set {name!r} has no configs (its card lists none); drop ':{config}'.")
        named = {f: {s for s, words in SPLIT_WORDS.items() if set(re.findall(r"[A-Za-z]+", f)) & set(words)}
                 for f in present if f.endswith((".json", ".jsonl")) and Path(f).name not in NOT_DATA}
        if not any(named.values()):  # no file names a split: all of them are the train split
            named = {f: {"train"} for f in named}
        files = [f for f, splits in named.items() if split in splits]
        if named and not files:
            raise DataError(f"data set {name!r} has no {split!r} split in its .json/.jsonl files; its splits: "
                            f"{', '.join(sorted(set().union(*named.values()))) or 'none'}.")
        where = f"split {split!r}"
    json_files = [folder / f for f in files if f.endswith((".json", ".jsonl"))]
    if not json_files:
        raise DataError(f"data set {name!r}, {where}, has no .json/.jsonl files (parquet and other formats are not "
                        "read): convert them to .jsonl and pass the file to --data.")
    return json_files
