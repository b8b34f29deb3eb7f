"""Training data in: the samples of every source (SOURCES.py: files of six formats, folders of shards,
save_to_disk folders, Hub datasets), each row read as CHAT.py reads a .jsonl line (every error names where),
and the token cache, the samples tokenized once into memory-mapped arrays with their target mask. BATCHES.py
cuts the cache into batches.

A row holds {"text"}, {"messages"}, {"prompt", "completion"}, Alpaca's fields, a preference pair
{"prompt", "chosen", "rejected"} or a prompt alone (CHAT.py); the first sample of a source sets its kind.
"""
import collections
import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ATOMIC import replacing
from CHAT import encode, parse, texts_of
from CONFIG import DataCfg
from REPORT import UserError, log
from SOURCES import fingerprint, resolve, rows

THREADS = max(2, os.cpu_count() or 1)  # chunks tokenized at once, each on one core
CACHE_FORMAT = 3  # tokens + target mask + document ends; sources resolved by SOURCES.py


def sources(dcfg):
    """(training sources, validation sources) of the data section: every --data and --val-data value resolved
    (SOURCES.resolve), so that a missing file or an unreachable Hub fails before a model loads."""
    if not dcfg.files:
        raise UserError("no data given - pass --data FILE [FILE …] or set data.files")
    return (tuple(resolve(name, dcfg, dcfg.split) for name in dcfg.files),
            tuple(resolve(name, dcfg, dcfg.val_split) for name in dcfg.val_files))


def local(paths):
    """The sources of local files and folders read with the default settings (no column map): for benches and
    tests."""
    return tuple(resolve(str(p), DataCfg(), "train") for p in paths)


def read_samples(source):
    """Yield (kind, sample, where) of every sample of one source, streaming it; a source holds one kind."""
    first = None
    for row, where in rows(source):
        kind, sample = parse(row, where)
        first = first or (kind, where)
        if {kind, first[0]} == {"prompt", "prompt_only"}:
            raise UserError(f"{where if kind == 'prompt_only' else first[1]}: no \"completion\" field, unlike "
                            f"{first[1] if kind == 'prompt_only' else where} - give every row a completion, or none "
                            "(prompts alone are for --grpo)")
        if kind != first[0]:
            raise UserError(f"{where}: a {kind} sample among {first[0]} samples (the first at {first[1]}) - keep "
                            "one kind per file or folder")
        yield kind, sample, where
    if first is None:
        raise UserError(f"{source.label()}: no samples (it is empty, or only blank lines or a header) - add data "
                        "or drop it")


def read_all(sources):
    return itertools.chain.from_iterable(read_samples(s) for s in sources)


def iter_texts(sources):
    """Every plain string in the data (the contents of conversations too): what a tokenizer is trained on."""
    return (text for _, sample, _ in read_all(sources) for text in texts_of(sample))


def source_kind(source):
    """The kind of a source's samples, read from its first sample."""
    return next(iter(read_samples(source)))[0]


def kinds(sources):
    """Every source's kind (text, messages, prompt, preference or prompt_only: CHAT.parse), read from its first
    sample."""
    return {s.label(): source_kind(s) for s in sources}


def check_loss_on(kinds, loss_on):
    """data.loss_on applies to every source's kind."""
    for name, kind in kinds.items():
        if loss_on not in (None, "all") and kind == "text":
            raise UserError(f"data.loss_on: {loss_on} needs conversations or prompt/completion pairs, but {name} holds "
                            "plain text - use loss_on all, or drop it")


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


def token_cache(sources, tokenizer, cache_dir, loss_on=None, chunk=4096):
    """Tokenize the sources once into cache_dir/<key>/: tokens.bin (uint16 or uint32), mask.bin (uint8) and
    ends.bin (int64), as nanoGPT's train.bin plus document boundaries and targets. Streams: one chunk of
    samples in memory at a time. Reused while sources, tokenizer, template and loss_on are unchanged."""
    path = os.path.join(cache_dir, fingerprint(sources, tokenizer_fingerprint(tokenizer), loss_on, CACHE_FORMAT))
    if os.path.exists(os.path.join(path, "meta.json")):
        log(f"reusing token cache {path}")
    else:
        t0 = time.time()
        with replacing(path) as tmp:
            n_docs, n_tokens = write_cache(tmp, sources, tokenizer, loss_on, chunk)
        log(f"tokenized {n_docs} documents, {n_tokens} tokens in {time.time() - t0:.1f}s -> {path}")
    meta = json.load(open(os.path.join(path, "meta.json")))
    whole = np.repeat([f["kind"] != "text" for f in meta["files"]], [f["documents"] for f in meta["files"]])
    return Corpus(np.memmap(os.path.join(path, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(meta["tokens"],)),
                  np.memmap(os.path.join(path, "mask.bin"), dtype=np.uint8, mode="r", shape=(meta["tokens"],)),
                  np.memmap(os.path.join(path, "ends.bin"), dtype=np.int64, mode="r", shape=(meta["documents"],)),
                  whole.astype(bool))


def write_cache(tmp, sources, tokenizer, loss_on, chunk):
    """Stream the sources through CHAT.encode into the cache folder `tmp`, one chunk of samples at a time, THREADS
    chunks at once while the next one is read and the oldest written. The tokenizer leaves Python's lock while it
    encodes, so one thread's Python work (targets, token lists) runs beside the others' encoding; with the
    tokenizers library's own threads off meanwhile, each chunk encodes on one core and no core waits (6% faster
    than one chunk at a time on every core, on 2 cores). -> (documents, tokens)"""
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    os.makedirs(tmp)
    kinds, counts = [None] * len(sources), [0] * len(sources)

    def samples():  # every sample, in order, noting each source's kind and its documents (a pair: two answers)
        for i, source in enumerate(sources):
            for sample in read_samples(source):
                kinds[i], counts[i] = sample[0], counts[i] + (2 if sample[0] == "preference" else 1)
                yield sample
    stream, n_tokens, jobs = samples(), 0, collections.deque()
    with open(os.path.join(tmp, "tokens.bin"), "wb") as tok_fh, open(os.path.join(tmp, "mask.bin"), "wb") as mask_fh, \
            open(os.path.join(tmp, "ends.bin"), "wb") as end_fh, environment(TOKENIZERS_PARALLELISM="false"), \
            without_gc(), ThreadPoolExecutor(THREADS) as tokenizing:
        for batch in iter(lambda: list(itertools.islice(stream, chunk)), []):
            jobs.append(tokenizing.submit(encode, batch, tokenizer, loss_on))
            if len(jobs) > THREADS:  # written in order, as each oldest chunk is done
                n_tokens = append(jobs.popleft().result(), n_tokens, (tok_fh, mask_fh, end_fh), dtype)
        for job in jobs:
            n_tokens = append(job.result(), n_tokens, (tok_fh, mask_fh, end_fh), dtype)
    with open(os.path.join(tmp, "meta.json"), "w") as fh:
        json.dump({"files": [{"path": s.label(), "kind": k, "documents": n} for s, k, n in zip(sources, kinds, counts)],
                   "tokens": n_tokens, "documents": sum(counts), "dtype": np.dtype(dtype).name}, fh)
    return sum(counts), n_tokens


@contextlib.contextmanager
def without_gc():
    """Python's cycle collector off for a block that makes millions of small lists and dicts (rows, token ids) and
    no cycles: refcounting frees them, and the collector's passes over every object of torch and transformers
    cost a fifth of the time (as nanochat turns it off in its training loop)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def environment(**values):
    """Environment variables set for the duration of a block, then as they were."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def append(docs, n_tokens, files, dtype):
    """Write encoded documents [(ids, mask, _)] to the open tokens, mask and ends files. -> tokens written in all"""
    tok_fh, mask_fh, end_fh = files
    lengths = np.fromiter(map(len, (d[0] for d in docs)), dtype=np.int64, count=len(docs))
    for column, fh, out_dtype in ((0, tok_fh, dtype), (1, mask_fh, np.uint8)):
        np.fromiter(itertools.chain.from_iterable(d[column] for d in docs), dtype=out_dtype,
                    count=int(lengths.sum())).tofile(fh)
    (n_tokens + np.cumsum(lengths)).tofile(end_fh)
    return n_tokens + int(lengths.sum())
