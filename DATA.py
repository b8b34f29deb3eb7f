"""Training text in, batches out: reading .txt/.jsonl files (every error names file:line), tokenizing,
the seeded sample order, and collating samples into padded batches.

.txt   one sample per non-empty line
.jsonl one JSON object per line with a string field "text"
"""
import functools
import hashlib
import itertools
import json
import os
import shutil
import time

import torch

from CONFIG import UserError, log

SUFFIXES = (".txt", ".jsonl")


def check_files(paths):
    """Fail early, naming the file, for anything read_texts cannot read."""
    if not paths:
        raise UserError("no data files given - pass --data FILE [FILE …] or set data.files")
    for p in paths:
        if os.path.isdir(p):
            raise UserError(f"{p}: is a directory - pass the .txt/.jsonl files inside it, e.g. --data {p}/*.txt")
        if not os.path.exists(p):
            raise UserError(f"{p}: no such data file - check the path given to --data / data.files")
        if not p.endswith(SUFFIXES):
            raise UserError(f"{p}: unsupported file type - use .txt (one sample per line) or .jsonl ({{\"text\": …}})")


def read_texts(path):
    """Yield (line_number, text) of every sample in one file, streaming it line by line."""
    jsonl, count = path.endswith(".jsonl"), 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff") if lineno == 1 else raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid UTF-8 (byte {e.start + 1} of the line) - "
                                "re-save the file as UTF-8")
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}) - "
                                    "each line must be one JSON object like {\"text\": \"…\"}")
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object like {{\"text\": \"…\"}}, "
                                    f"got a {type(obj).__name__}")
                if not isinstance(obj.get("text"), str):
                    what = "no \"text\" field" if "text" not in obj else f"\"text\" is a {type(obj['text']).__name__}"
                    raise UserError(f"{path}:{lineno}: {what} - each object needs a string field \"text\"")
                text = obj["text"]
            else:
                text = line.rstrip("\r\n")
            count += 1
            yield lineno, text
    if count == 0:
        raise UserError(f"{path}: no samples (the file is empty or only blank lines) - add text or drop the file")


def iter_texts(paths):
    for p in paths:
        for _, text in read_texts(p):
            yield text


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
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def token_cache(paths, tokenizer, cache_dir, chunk=4096):
    """Tokenize the files once into cache_dir/<key>/: tokens.bin (every document's ids + EOS, uint16 or
    uint32, back to back) and ends.bin (int64 end offset of each document), as nanoGPT's train.bin plus
    document boundaries. Streams: one chunk of lines in memory at a time. Reused while files and
    tokenizer are unchanged. Returns (tokens, ends) as read-only memory maps."""
    import numpy as np
    path = os.path.join(cache_dir, fingerprint(paths, tokenizer_fingerprint(tokenizer)))
    if not os.path.exists(os.path.join(path, "meta.json")):
        dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        eos, n_tokens, n_docs, buf, t0 = tokenizer.eos_token_id, 0, 0, [], time.time()
        with open(os.path.join(tmp, "tokens.bin"), "wb") as tok_fh, open(os.path.join(tmp, "ends.bin"), "wb") as end_fh:
            def flush():
                nonlocal n_tokens, n_docs
                # the fast tokenizer encodes a list on all cores; add_special_tokens: BOS where the family uses one
                docs = [ids if ids and ids[-1] == eos else ids + [eos] for ids in tokenizer(buf)["input_ids"]]
                lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
                np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(lengths.sum())).tofile(tok_fh)
                (n_tokens + np.cumsum(lengths)).tofile(end_fh)
                n_tokens, n_docs = n_tokens + int(lengths.sum()), n_docs + len(docs)
                buf.clear()
            for text in iter_texts(paths):
                buf.append(text)
                if len(buf) == chunk:
                    flush()
            flush()
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump({"files": paths, "tokens": n_tokens, "documents": n_docs, "dtype": np.dtype(dtype).name}, fh)
        os.replace(tmp, path) if not os.path.exists(path) else shutil.rmtree(tmp)
        log(f"tokenized {n_docs} documents, {n_tokens} tokens in {time.time() - t0:.1f}s -> {path}")
    else:
        log(f"reusing token cache {path}")
    meta = json.load(open(os.path.join(path, "meta.json")))
    return (np.memmap(os.path.join(path, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(meta["tokens"],)),
            np.memmap(os.path.join(path, "ends.bin"), dtype=np.int64, mode="r", shape=(meta["documents"],)))


def spans(ends, first_doc, last_doc, max_length, packing):
    """The training sequences of documents [first_doc, last_doc) as an (N, 2) array of token ranges.

    packing: the documents' tokens (each ending in EOS) back to back, cut into blocks of max_length that
      overlap by one token, so that every token but the very first is a target exactly once; the last,
      shorter block is kept (and padded in its batch), never dropped.
    otherwise: one sequence per document, cut to max_length (one warning counts the cuts).
    """
    import numpy as np
    starts = np.concatenate([[0], ends[:-1]])[first_doc:last_doc]
    stops = np.asarray(ends[first_doc:last_doc])
    if packing:
        lo, hi = int(starts[0]), int(stops[-1])
        block_starts = np.arange(lo, max(lo + 1, hi - 1), max_length - 1, dtype=np.int64)
        return np.stack([block_starts, np.minimum(block_starts + max_length, hi)], axis=1)
    cut = int((stops - starts > max_length).sum())
    if cut:
        log(f"warning: {cut} of {len(starts)} samples are longer than max_length={max_length} tokens "
            "and were truncated (raise --max-length to keep them whole)")
    return np.stack([starts, np.minimum(stops, starts + max_length)], axis=1)


def held_out(ends, fraction, max_tokens):
    """How many of the last documents validation takes: `fraction` of them, but no more than fit in max_tokens
    (at least one), so that a large corpus does not hold out gigabytes."""
    import numpy as np
    n_val = int(len(ends) * fraction)
    if not n_val:
        return 0
    starts = np.concatenate([[0], ends[:-1]])
    fit = len(ends) - int(np.searchsorted(starts, int(ends[-1]) - max_tokens, side="left"))
    if fit < n_val:
        log(f"validation: holding out the last {max(1, fit)} documents, not {n_val} ({fraction:.0%}): "
            f"data.val_max_tokens is {max_tokens}")
    return max(1, min(n_val, fit))


def evenly_spaced(spans, count):
    """A fixed subset of `count` sequences spread evenly over `spans` (all of them when count is 0 or covers
    them): every validation during a run scores the same sequences, so the points of the curve compare."""
    if not count or count >= len(spans):
        return spans
    return spans[[i * len(spans) // count for i in range(count)]]


def load(dcfg, tokenizer, max_length):
    """(tokens, train spans, val tokens, val spans) for the data section of the config; val may be None."""
    tokens, ends = token_cache(dcfg.files, tokenizer, dcfg.cache_dir)
    n_val = held_out(ends, dcfg.val_fraction, dcfg.val_max_tokens)
    if dcfg.val_files:
        check_files(dcfg.val_files)
        val_tokens, val_ends = token_cache(dcfg.val_files, tokenizer, dcfg.cache_dir)
        val = spans(val_ends, 0, len(val_ends), max_length, dcfg.packing)
    elif n_val:  # the last val_fraction of the documents, in file order
        if n_val == len(ends):
            raise UserError(f"data.val_fraction: {dcfg.val_fraction} leaves no training documents")
        val_tokens, val = tokens, spans(ends, len(ends) - n_val, len(ends), max_length, dcfg.packing)
    else:
        val_tokens, val = None, None
    train = spans(ends, 0, len(ends) - (0 if dcfg.val_files else n_val), max_length, dcfg.packing)
    in_blocks = int((train[:, 1] - train[:, 0]).sum())
    log(f"data: {int(ends[-1])} tokens in {len(ends)} documents -> {len(train)} "
        f"{'packed blocks' if dcfg.packing else 'samples'} of <= {max_length} tokens ({in_blocks} tokens)"
        + (f"; validation: {len(val)} sequences" if val is not None else ""))
    return tokens, train, val_tokens, val


@functools.lru_cache(maxsize=2)  # a pure function of its arguments; one epoch's order is reused by every step
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def sample_indices(start, count, n, seed):
    """Sample indices at global positions [start, start+count) of the endless stream of seeded epochs.

    Epoch e visits all n samples in the order randperm(n) seeded with (seed, e); position p is sample
    order(p // n)[p % n]. A checkpoint stores only the position, so resuming never replays data.
    """
    out, p = [], start
    while p < start + count:
        epoch, i = divmod(p, n)
        order = epoch_order(n, seed, epoch)
        take = min(n - i, start + count - p)
        out += order[i:i + take].tolist()
        p += take
    return out


def collate(batch, pad_id):
    """Right-pad a list of token-id lists into input_ids/attention_mask/labels, each (B, T).

    Pads are masked by position (attention_mask == 0 -> label -100), never by comparing ids with pad_id:
    GPT-2 pads with its EOS id, and EOS must stay a target.
    """
    T = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def gather(tokens, spans, indices):
    """The token-id lists of the given sequences, read from the (memory-mapped) token array."""
    return [tokens[spans[i, 0]:spans[i, 1]].tolist() for i in indices]


def count_targets(batch):
    """Tokens that are predicted (the model shifts labels left by one inside its loss)."""
    return int((batch["labels"][:, 1:] != -100).sum())
