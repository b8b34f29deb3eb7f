"""Where training data lives: what each --data value names (a Source), its key for the token cache, and its
rows, each a dict of the keys a .jsonl line may hold (KEYS) after the column map, read by READERS.py. DATA.py
parses the rows into samples and tokenizes them into its cache.

    a.txt a.jsonl a.json a.csv a.tsv a.parquet (+ .gz, .zst)   a file (READERS.py says how each is read)
    FOLDER                     shards: its data files and its subfolders', all of one format, in name order
    FOLDER from save_to_disk   a datasets.Dataset, or a DatasetDict's split (data.split)
    FOLDER with splits         a dataset repository (files named train…, test…, or a card with configs:)
    owner/name                 a Hub dataset: not a file or folder here, and shaped like a Hub id

A dataset repository, local or on the Hub, is read with the `datasets` library (its split, subset and
revision); everything else by READERS.py alone, so `datasets` is needed only for those and save_to_disk folders.
"""
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import socket
import urllib.parse
from typing import Optional

from READERS import arrow_rows, csv_rows, json_rows, jsonl_rows, parquet_rows, text_rows
from REPORT import UserError, first_line, log, need, suggest

KEYS = ("text", "messages", "prompt", "completion", "chosen", "rejected", "instruction", "input", "output")
FORMATS = ("txt", "jsonl", "json", "csv", "tsv", "parquet")
COMPRESSIONS = (".gz", ".zst")
# how `datasets` finds splits by file and folder names (train-00000-of-00002.parquet, data/test/x.csv, dev.jsonl)
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}
SPLIT_PART = re.compile(r"(?P<split>[a-z]+)([-_.\d]|$)")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_RULE = "a --data value is read from the Hub only when it is neither a file nor a folder here and has a Hub id's form"


@dataclasses.dataclass(frozen=True)
class Source:
    """One --data value, resolved: what is read and how. Every field but name makes its rows what they are,
    so fingerprint() is a key of them."""
    name: str                       # as the user wrote it
    format: str                     # one of FORMATS (files), "saved" (save_to_disk) or "repo" (datasets)
    files: tuple = ()               # the files read, in order; a Hub dataset's are hf://…@commit/… paths
    columns: tuple = ()             # ((key, column or None), …): data.columns
    max_samples: Optional[int] = None
    split: Optional[str] = None     # saved and repo only
    subset: Optional[str] = None
    revision: Optional[str] = None
    streaming: bool = False

    def label(self):
        return f"{self.name}[{self.split}]" if self.split else self.name


def resolve(name, dcfg, split):
    """The Source that --data value `name` names (split: data.split, or data.val_split for --val-data)."""
    columns = check_columns(dcfg.columns)
    common = dict(columns=columns, max_samples=dcfg.max_samples)
    if os.path.isfile(name):
        return Source(name, format_of(name), (name,), **common)
    if os.path.isdir(name):
        return folder(name, dcfg, split, common)
    if format_of(name, known_only=False) or not HUB_ID.fullmatch(name) or name.startswith((".", "/")):
        raise UserError(f"{name}: no such file or folder - check the path given to --data / data.files ({HUB_RULE}, "
                        "owner/name)")
    if not importlib.util.find_spec("datasets"):
        raise UserError(f"{name}: no such file or folder - check the path given to --data / data.files (to read it "
                        "as a Hub dataset id: pip install datasets)")
    return repository(name, dcfg, split, common)


def check_columns(columns):
    """data.columns as sorted (key, column or None) pairs, each key one of KEYS."""
    for key, column in columns.items():
        if key not in KEYS:
            raise UserError(f"data.columns: {key!r} is not a key a row can have ({', '.join(KEYS)})"
                            f"{suggest(str(key), list(KEYS))}")
        if column is not None and not isinstance(column, str):
            raise UserError(f"data.columns: {key}: {column!r} - give a column name (quoted if it is a number: "
                            f"{key}='{column}'), or nothing to ignore the column")
    return tuple(sorted(columns.items()))


def format_of(path, known_only=True):
    """txt, jsonl, json, csv, tsv or parquet, by the name's suffix (.gz/.zst after it: compressed)."""
    base = next((path[:-len(c)] for c in COMPRESSIONS if path.endswith(c)), path)
    fmt = os.path.splitext(base)[1].lstrip(".").lower()
    if fmt in FORMATS and not (fmt == "parquet" and base != path):
        return fmt
    if known_only:
        raise UserError(f"{path}: unsupported file type - use .txt, .jsonl, .json, .csv, .tsv or .parquet (the "
                        "first five may end in .gz or .zst), or a folder of them")
    return None


def folder(name, dcfg, split, common):
    """A folder: save_to_disk output, a dataset repository (files named by split), or shards of one format."""
    top = set(os.listdir(name))
    if "dataset_dict.json" in top or {"state.json", "dataset_info.json"} <= top:
        return saved(name, split, common)
    files = []
    for here, dirs, names in os.walk(name):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]  # data/.cache, .git, __pycache__
        files += [os.path.join(here, n) for n in names if not n.startswith((".", "_"))]
    data = sorted((f for f in files if format_of(f, known_only=False)), key=lambda f: os.path.relpath(f, name))
    if by_split(data, name) or has_configs(os.path.join(name, "README.md")):
        return repository(name, dcfg, split, common, data)
    if not data:
        raise UserError(f"{name}: no data files in this folder (.txt, .jsonl, .json, .csv, .tsv, .parquet) - "
                        "pass a folder that holds some")
    formats = sorted({format_of(f) for f in data})
    if len(formats) > 1:
        count = ", ".join(f"{sum(format_of(f) == x for f in data)} .{x}" for x in formats)
        raise UserError(f"{name}: mixed formats in one folder ({count}) - keep one format per folder, or pass "
                        "the files")
    return Source(name, formats[0], tuple(data), **common)


def by_split(files, root):
    """Whether the files are named for more than one split, as a dataset repository's are."""
    found = set()
    for f in files:
        for part in os.path.relpath(f, root).lower().split(os.sep):
            m = SPLIT_PART.match(part)
            if m and m["split"] in SPLIT_NAMES:
                found.add(SPLIT_NAMES[m["split"]])
                break
    return len(found) > 1


def has_configs(readme):
    """Whether a dataset card declares its configs (and so its splits) in its YAML header."""
    if not os.path.isfile(readme):
        return False
    with open(readme, encoding="utf-8", errors="replace") as fh:
        head = fh.read(1 << 16)
    return head.startswith("---") and re.search(r"^configs:", head.split("\n---", 1)[0], re.M) is not None


def saved(name, split, common):
    """A folder written by datasets' save_to_disk: a Dataset, or a DatasetDict whose split is read."""
    ds = open_saved(name)
    if hasattr(ds, "keys"):  # a DatasetDict
        if split not in ds:
            raise UserError(f"{name}: no split {split!r} in this dataset (it has: {', '.join(ds)}) - pass "
                            f"--data-split{suggest(split, list(ds))}")
        name_of = os.path.join(name, split)
    else:
        split, name_of = None, name
    files = sorted(os.path.join(name_of, f) for f in os.listdir(name_of) if f.endswith((".arrow", ".json")))
    return Source(name, "saved", tuple(files), split=split, **common)


def open_saved(name):
    datasets = need("datasets", f"{name}: a save_to_disk folder", "datasets")
    try:
        return datasets.load_from_disk(name)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{name}: not a readable save_to_disk folder ({first_line(e, 160)}) - write it again with "
                        "save_to_disk")


def repository(name, dcfg, split, common, local=()):
    """A dataset repository, local or on the Hub, as `datasets` resolves it: the split's files (at the commit
    the revision names), so the cache is rebuilt when the dataset changes. local: a folder's data files, those
    that no split reads are named in a note."""
    builder = open_repository(name, dcfg.subset, dcfg.revision)
    files = builder.config.data_files or {}
    if split not in files:
        raise UserError(f"{name}: no split {split!r} (it has: {', '.join(files) or 'none'}) - pass --data-split"
                        f"{suggest(split, list(files))}")
    read = {str(f) for split_files in files.values() for f in split_files}
    left = [f for f in local if os.path.abspath(f) not in read]
    if left:
        log(f"note: {name} is read as a dataset repository (its files are named by split), and `datasets` leaves "
            f"out {len(left)} of its data files ({', '.join(left[:3])}{', …' if len(left) > 3 else ''}) - pass "
            "files to read them")
    return Source(name, "repo", tuple(str(f) for f in files[split]), split=split, subset=dcfg.subset,
                  revision=dcfg.revision, streaming=dcfg.streaming, **common)


def open_repository(name, subset, revision):
    datasets = need("datasets", f"{name}: a dataset repository or Hub dataset", "datasets")
    datasets.disable_progress_bars()  # our log is the progress
    if not os.path.isdir(name):
        check_reachable(name)
    try:
        return datasets.load_dataset_builder(name, subset, revision=revision)
    except ConnectionError as e:  # offline (HF_HUB_OFFLINE) and not in the cache
        raise UserError(f"{name}: the Hub cannot be reached and the dataset is not in the Hugging Face cache "
                        f"({first_line(e, 120)}) - {LOCAL_COPY.format(name=name)}")
    except ValueError as e:  # a subset that does not exist names those that do
        raise UserError(f"{name}: {first_line(e, 300)} - pass --data-subset")
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"{name}: no such dataset ({first_line(e, 160)}) - check the name ({HUB_RULE})")


LOCAL_COPY = ("download it where there is a network (hf download {name} --repo-type dataset --local-dir DIR) and "
              "pass --data DIR")


def check_reachable(name):
    """Fail at once, not after a minute of retries, when the Hub cannot be reached (HF_HUB_OFFLINE: the
    `datasets` cache is used and this check skipped)."""
    hub = need("huggingface_hub", "a Hub dataset", "huggingface_hub")
    if hub.constants.HF_HUB_OFFLINE:
        return
    url = urllib.parse.urlparse(hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError:
        raise UserError(f"{name}: not a file or folder here, so read as a Hub dataset id ({HUB_RULE}), and "
                        f"{url.hostname} cannot be reached - {LOCAL_COPY.format(name=name)}")


def fingerprint(sources, *extra):
    """A key that changes when any source (its files: path, size, mtime, first and last 64 KiB; a Hub dataset's
    commit and split; the column map; max_samples) or `extra` changes."""
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for s in sources:
        h.update(json.dumps([s.format, s.columns, s.max_samples, s.split, s.subset, s.revision]).encode())
        for f in s.files:
            if not os.path.isfile(f):  # a Hub dataset's file: its path holds the commit
                h.update(f.encode())
                continue
            st = os.stat(f)
            h.update(f"{os.path.realpath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 16))
                fh.seek(max(0, st.st_size - (1 << 16)))
                h.update(fh.read())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- rows

def rows(source, every_column=False):
    """Yield (row, where) for every row of a source, in order: at most max_samples, each with LLM-MINI's keys
    (data.columns applied: a key mapped to a column reads that column, or its own where a source has no such
    column; a key mapped to nothing is dropped). every_column: the row's other columns too (GRPO's rewards read
    them)."""
    mapped = {key: column for key, column in source.columns if column}
    own = [k for k in KEYS if k not in dict(source.columns)]  # keys read under their own name
    key_of = {column: key for key, column in mapped.items()} | {k: k for k in own}
    other = lambda c: every_column and c not in key_of and c not in dict(source.columns)  # noqa: E731

    def select(columns, where):  # [(column, key)] worth reading: a mapped column where the data has it, else
        read = [(c, key_of[c]) for c in columns if c in key_of]  # the key's own name (a validation set's text)
        for key, column in mapped.items():
            if column not in columns and key in columns:
                read.append((key, key))
            elif column not in columns:
                raise UserError(f"data.columns: {key}={column}, but {where} has neither {column!r} nor {key!r} (it "
                                f"has: {', '.join(columns)}){suggest(column, list(columns))}")
        if not read:
            raise UserError(unreadable(where, columns))
        return read + [(c, c) for c in columns if other(c) and (c, c) not in read]

    def rename(row):  # a JSON object, whose fields may differ from row to row
        if not isinstance(row, dict):  # for CHAT.parse to refuse, naming where
            return row
        out = {k: row[k] for k in own if k in row}
        for key, column in mapped.items():
            if column in row or key in row:
                out[key] = row[column] if column in row else row[key]
        return out | {k: v for k, v in row.items() if other(k) and k not in out}
    if source.format in ("saved", "repo"):
        found = dataset_rows(source, select)
    else:
        reader = {"txt": text_rows, "jsonl": jsonl_rows, "json": json_rows, "csv": csv_rows, "tsv": csv_rows,
                  "parquet": parquet_rows}[source.format]
        found = itertools.chain.from_iterable(reader(f, select, rename) for f in source.files)
    return itertools.islice(found, source.max_samples)


def unreadable(where, columns):
    """The error for data with none of the keys: its columns, and the --columns that would map them."""
    close = [(k, c) for c in columns for k in KEYS if suggest(c, [k])]
    hint = f"did you mean --columns {close[0][0]}={close[0][1]}?" if close else (
        f"map one, e.g. --columns text={columns[0]}" if columns else "give each row a text field")
    return (f"{where}: none of the fields LLM-MINI reads ({', '.join(KEYS[:6])}, …); it has: "
            f"{', '.join(columns) or 'none'} - {hint}")


def dataset_rows(source, select):
    """The rows of a save_to_disk folder or a dataset repository (streamed with data.streaming), in order."""
    if source.format == "saved":
        ds = open_saved(source.name)
        ds = ds[source.split] if source.split else ds
    else:
        builder = open_repository(source.name, source.subset, source.revision)
        if source.streaming:
            ds = builder.as_streaming_dataset(split=source.split)
        else:
            builder.download_and_prepare()
            ds = builder.as_dataset(split=source.split)
    return arrow_rows(ds, select, source.label())
