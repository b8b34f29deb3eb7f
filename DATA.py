"""Training data in, batches out: reading .txt/.jsonl files (every error names file:line), the token cache
with its target mask, packing, the seeded sample order, and collating sequences into batches.

.txt   one plain-text sample per non-empty line
.jsonl one JSON object per line: {"text"}, {"messages"}, {"prompt", "completion"} or Alpaca (CHAT.py); the
       first sample of a file sets its kind
"""
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import time

import numpy as np
import torch

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
                counts[p] += 1
                if len(buf) == chunk:
                    flush()
        if buf:
            flush()
    with open(os.path.join(tmp, "meta.json"), "w") as fh:
        json.dump({"files": [{"path": p, "kind": file_kind(p), "documents": counts[p]} for p in paths],
                   "tokens": n_tokens, "documents": sum(counts.values()), "dtype": np.dtype(dtype).name}, fh)
    return sum(counts.values()), n_tokens


@dataclasses.dataclass(frozen=True)
class Sequences:
    """What training or validation iterates over: sequence i is the segments segments[offsets[i]:offsets[i+1]]
    of the corpus (token ranges, each a document or a piece of one) side by side, each seeing only itself."""
    corpus: Corpus
    segments: np.ndarray  # (S, 2) token ranges
    offsets: np.ndarray   # (N + 1,) into segments
    lengths: np.ndarray   # (N,) tokens of each sequence
    targets: np.ndarray   # (N,) target tokens of each sequence

    def __len__(self):
        return len(self.offsets) - 1


def sequences(corpus, first_doc, last_doc, max_length, packing, too_long="truncate"):
    """The sequences of documents [first_doc, last_doc), at most max_length tokens each.

    A document longer than max_length is truncated or dropped (too_long); with packing, plain text is instead
    cut into pieces of max_length that overlap by one token, so every token but a document's first is still
    a target exactly once. packing: consecutive documents (or pieces) fill each sequence up to max_length,
    never split across two; otherwise one document per sequence. A segment left with no targets is dropped.
    One warning counts each of these.
    """
    ends, mask = corpus.ends, corpus.mask
    segs, targets, cut, dropped, empty = [], [], 0, 0, 0
    for d in range(first_doc, last_doc):
        s, e = int(ends[d - 1]) if d else 0, int(ends[d])
        whole = bool(corpus.whole[d])
        if e - s <= max_length:
            parts = [(s, e)]
        elif packing and not whole:
            parts = [(p, min(p + max_length, e)) for p in range(s, e - 1, max_length - 1)]
        elif too_long == "drop":
            dropped += 1
            continue
        else:
            parts, cut = [(s, s + max_length)], cut + 1
        for a, b in parts:
            n = b - a - 1 if not whole else int(mask[a + 1:b].sum())  # plain text: every token but the first
            if n:
                segs.append((a, b))
                targets.append(n)
            else:
                empty += 1
    if cut or dropped:
        log(f"warning: {cut + dropped} of {last_doc - first_doc} samples are longer than max_length={max_length} "
            f"tokens and were {'truncated' if cut else 'dropped'} (data.too_long; raise --max-length to keep them whole)")
    if empty:
        log(f"warning: {empty} samples have no target tokens left (after truncation, or none to begin with) "
            "and were dropped")
    if not segs:
        raise UserError("no training samples with target tokens remain - check data.loss_on, max_length and too_long")
    segs, targets = np.array(segs, dtype=np.int64), np.array(targets, dtype=np.int64)
    seg_len = segs[:, 1] - segs[:, 0]
    offsets = np.arange(len(segs) + 1)
    if packing:
        starts, fill = [0], 0
        for i, n in enumerate(seg_len.tolist()):
            if fill + n > max_length:
                starts.append(i)
                fill = 0
            fill += n
        offsets = np.array(starts + [len(segs)], dtype=np.int64)
    return Sequences(corpus, segs, offsets, np.add.reduceat(seg_len, offsets[:-1]),
                     np.add.reduceat(targets, offsets[:-1]))


def held_out(ends, fraction, max_tokens):
    """How many of the last documents validation takes: `fraction` of them, but no more than fit in max_tokens
    (at least one), so that a large corpus does not hold out gigabytes."""
    n_val = int(len(ends) * fraction)
    if not n_val:
        return 0
    starts = np.concatenate([[0], ends[:-1]])
    fit = len(ends) - int(np.searchsorted(starts, int(ends[-1]) - max_tokens, side="left"))
    if fit < n_val:
        log(f"validation: holding out the last {max(1, fit)} documents, not {n_val} ({fraction:.0%}): "
            f"data.val_max_tokens is {max_tokens}")
    return max(1, min(n_val, fit))


def evenly_spaced(n, count):
    """Indices of a fixed subset of `count` of n sequences spread evenly (all n when count is 0 or covers them):
    every validation during a run scores the same sequences, so the points of the curve compare."""
    if not count or count >= n:
        return list(range(n))
    return [i * n // count for i in range(count)]


def load(dcfg, tokenizer, max_length):
    """(train Sequences, validation Sequences or None) for the data section of the config."""
    corpus = token_cache(dcfg.files, tokenizer, dcfg.cache_dir, dcfg.loss_on)
    n_docs = len(corpus.ends)
    n_val = 0 if dcfg.val_files else held_out(corpus.ends, dcfg.val_fraction, dcfg.val_max_tokens)
    if n_val == n_docs:
        raise UserError(f"data.val_fraction: {dcfg.val_fraction} leaves no training documents")
    val = None
    if dcfg.val_files:
        check_files(dcfg.val_files)
        val_corpus = token_cache(dcfg.val_files, tokenizer, dcfg.cache_dir, dcfg.loss_on)
        val = sequences(val_corpus, 0, len(val_corpus.ends), max_length, dcfg.packing, dcfg.too_long)
    elif n_val:  # the last documents, in file order
        val = sequences(corpus, n_docs - n_val, n_docs, max_length, dcfg.packing, dcfg.too_long)
    train = sequences(corpus, 0, n_docs - n_val, max_length, dcfg.packing, dcfg.too_long)
    fill = f", {train.lengths.sum() / (len(train) * max_length):.0%} full" if dcfg.packing else ""
    log(f"data: {int(corpus.ends[-1])} tokens in {n_docs} documents -> {len(train)} "
        f"{'packed blocks' if dcfg.packing else 'samples'} of <= {max_length} tokens{fill} "
        f"({int(train.targets.sum())} target tokens)" + (f"; validation: {len(val)} sequences" if val else ""))
    return train, val


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


def gather(seqs, indices):
    """[(ids, labels, position ids)] of the given sequences, read from the memory-mapped corpus. Labels are -100
    where a token is not a target; position ids restart at every segment, which is how transformers knows where
    packed documents begin (it then builds a block-diagonal causal mask: no document sees another)."""
    out, c = [], seqs.corpus
    for i in indices:
        segs = seqs.segments[seqs.offsets[i]:seqs.offsets[i + 1]]
        ids = np.concatenate([c.tokens[a:b] for a, b in segs]).astype(np.int64)
        labels = np.where(np.concatenate([c.mask[a:b] for a, b in segs]) > 0, ids, -100)
        labels[np.cumsum(segs[:, 1] - segs[:, 0]) - (segs[:, 1] - segs[:, 0])] = -100  # a segment's first token
        out.append((ids, labels, np.concatenate([np.arange(b - a) for a, b in segs])))
    return out


def plain(ids):
    """One plain-text sequence as gather returns it: every token but the first is a target."""
    return np.asarray(ids), np.asarray([-100] + list(ids[1:])), np.arange(len(ids))


def collate(batch, pad_id):
    """Right-pad [(ids, labels, position ids)] into input_ids/labels/position_ids, each (B, T).

    No attention mask: a causal model never lets a token see the pads after it, and the pads are a segment
    of their own (positions restart) that no real token attends to; their labels are -100. Pads are told
    apart by position, never by comparing ids with pad_id: GPT-2 pads with its EOS id, and EOS is a target.
    """
    T = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    position_ids = torch.arange(T).repeat(len(batch), 1)
    for row, (ids, lab, pos) in enumerate(batch):
        n = len(ids)
        input_ids[row, :n], labels[row, :n] = torch.as_tensor(ids), torch.as_tensor(lab)
        position_ids[row, :n], position_ids[row, n:] = torch.as_tensor(pos), torch.arange(T - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def count_targets(batch):
    """Tokens that are predicted (the model shifts labels left by one inside its loss)."""
    return int((batch["labels"][:, 1:] != -100).sum())
