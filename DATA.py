"""Training data in: reading .txt/.jsonl files (every error names file:line) and the token cache, the files
tokenized once into memory-mapped arrays with their target mask. BATCHES.py cuts the cache into batches.

.txt   one plain-text sample per non-empty line
.jsonl one JSON object per line: {"text"}, {"messages"}, {"prompt", "completion"}, Alpaca or preference
       pairs {"prompt", "chosen", "rejected"} (CHAT.py); the first sample of a file sets its kind
"""
import dataclasses
import hashlib
import itertools
import json
import os
import time

import numpy as np

from ATOMIC import replacing
from CHAT import encode, parse, texts_of
from CONFIG import UserError, log

SUFFIXES = (".txt", ".jsonl")
CACHE_FORMAT = 2  # tokens + target mask + document ends


def check_files(paths):
    """Fail early, naming the file, for anything read_samples cannot read."""
    if not paths:
        raise UserError("no data files given - pass --data FILE [FILE …] or set data.files")
    for p in paths:
        if os.path.isdir(p):
            raise UserError(f"{p}: is a directory - pass the .txt/.jsonl files inside it, e.g. --data {p}/*.txt")
        if not os.path.exists(p):
            raise UserError(f"{p}: no such data file - check the path given to --data / data.files")
        if not p.endswith(SUFFIXES):
            raise UserError(f"{p}: unsupported file type - use .txt (one sample per line) or .jsonl ({{\"text\": …}})")


def read_samples(path):
    """Yield (kind, sample, "file:line") of every sample in one file, streaming it line by line."""
    jsonl, first = path.endswith(".jsonl"), None
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff") if lineno == 1 else raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: invalid UTF-8 (byte {e.start + 1} of the line) - re-save the file as UTF-8")
            if not line.strip():
                continue
            if not jsonl:
                yield "text", {"text": line.rstrip("\r\n")}, where
                first = first or ("text", lineno)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg}, column {e.colno}) - each line must be one JSON "
                                "object like {\"text\": \"…\"}")
            kind, sample = parse(obj, where)
            first = first or (kind, lineno)
            if kind != first[0]:
                raise UserError(f"{where}: a {kind} sample in a file of {first[0]} samples (line {first[1]}) - "
                                "keep one kind per file")
            yield kind, sample, where
    if first is None:
        raise UserError(f"{path}: no samples (the file is empty or only blank lines) - add text or drop the file")


def read_all(paths):
    return itertools.chain.from_iterable(read_samples(p) for p in paths)


def iter_texts(paths):
    """Every plain string in the files (the contents of conversations too): what a tokenizer is trained on."""
    return (text for _, sample, _ in read_all(paths) for text in texts_of(sample))


def file_kind(path):
    """The kind of a file's samples, read from its first sample."""
    return next(iter(read_samples(path)))[0]


def check_loss_on(paths, loss_on):
    """Every file's kind, after checking that data.loss_on applies to it."""
    kinds = {p: file_kind(p) for p in paths}
    for p, kind in kinds.items():
        if loss_on not in (None, "all") and kind == "text":
            raise UserError(f"data.loss_on: {loss_on} needs conversations or prompt/completion pairs, but {p} holds "
                            "plain text - use loss_on all, or drop the file")
    return kinds


def fingerprint(paths, *extra):
    """A key that changes when any file (path, size, mtime, first and last 64 KiB) or `extra` changes."""
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
        with open(p, "rb") as fh:
            h.update(fh.read(1 << 16))
            fh.seek(max(0, st.st_size - (1 << 16)))
            h.update(fh.read())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}|{tokenizer.chat_template}".encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A token cache, memory-mapped: every document's tokens back to back and which of them are targets."""
    tokens: np.ndarray  # (T,) token ids; each document ends in EOS (or its template's end of turn)
    mask: np.ndarray    # (T,) uint8: 1 where the token is a target, predicted from the tokens before it
    ends: np.ndarray    # (D,) int64 end offset of each document
    whole: np.ndarray   # (D,) bool: a conversation or prompt/completion, never cut into pieces


def token_cache(paths, tokenizer, cache_dir, loss_on=None, chunk=4096):
    """Tokenize the files once into cache_dir/<key>/: tokens.bin (uint16 or uint32), mask.bin (uint8) and
    ends.bin (int64), as nanoGPT's train.bin plus document boundaries and targets. Streams: one chunk of
    samples in memory at a time. Reused while files, tokenizer, template and loss_on are unchanged."""
    path = os.path.join(cache_dir, fingerprint(paths, tokenizer_fingerprint(tokenizer), loss_on, CACHE_FORMAT))
    if os.path.exists(os.path.join(path, "meta.json")):
        log(f"reusing token cache {path}")
    else:
        t0 = time.time()
        with replacing(path) as tmp:
            n_docs, n_tokens = write_cache(tmp, paths, tokenizer, loss_on, chunk)
        log(f"tokenized {n_docs} documents, {n_tokens} tokens in {time.time() - t0:.1f}s -> {path}")
    meta = json.load(open(os.path.join(path, "meta.json")))
    whole = np.repeat([f["kind"] != "text" for f in meta["files"]], [f["documents"] for f in meta["files"]])
    return Corpus(np.memmap(os.path.join(path, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(meta["tokens"],)),
                  np.memmap(os.path.join(path, "mask.bin"), dtype=np.uint8, mode="r", shape=(meta["tokens"],)),
                  np.memmap(os.path.join(path, "ends.bin"), dtype=np.int64, mode="r", shape=(meta["documents"],)),
                  whole.astype(bool))


def write_cache(tmp, paths, tokenizer, loss_on, chunk):
    """Stream the files through CHAT.encode into the cache folder `tmp`, one chunk of samples at a time.
    -> (documents, tokens)"""
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    os.makedirs(tmp)
    n_tokens, counts, buf = 0, {p: 0 for p in paths}, []
    with open(os.path.join(tmp, "tokens.bin"), "wb") as tok_fh, open(os.path.join(tmp, "mask.bin"), "wb") as mask_fh, \
            open(os.path.join(tmp, "ends.bin"), "wb") as end_fh:

        def flush():
            nonlocal n_tokens
            docs = encode(buf, tokenizer, loss_on)
            lengths = np.fromiter(map(len, (d[0] for d in docs)), dtype=np.int64, count=len(docs))
            for column, fh, out_dtype in ((0, tok_fh, dtype), (1, mask_fh, np.uint8)):
                np.fromiter(itertools.chain.from_iterable(d[column] for d in docs), dtype=out_dtype,
                            count=int(lengths.sum())).tofile(fh)
            (n_tokens + np.cumsum(lengths)).tofile(end_fh)
            n_tokens += int(lengths.sum())
            buf.clear()
        for p in paths:
            for sample in read_samples(p):
                buf.append(sample)
                counts[p] += 2 if sample[0] == "preference" else 1  # documents: a pair's two answers
                if len(buf) == chunk:
                    flush()
        if buf:
            flush()
    with open(os.path.join(tmp, "meta.json"), "w") as fh:
        json.dump({"files": [{"path": p, "kind": file_kind(p), "documents": counts[p]} for p in paths],
                   "tokens": n_tokens, "documents": sum(counts.values()), "dtype": np.dtype(dtype).name}, fh)
    return sum(counts.values()), n_tokens
