"""Training text in, batches out: reading .txt/.jsonl files (every error names file:line), tokenizing,
the seeded sample order, and collating samples into padded batches.

.txt   one sample per non-empty line
.jsonl one JSON object per line with a string field "text"
"""
import json
import os
import sys

import torch

from CONFIG import UserError

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


def tokenize(paths, tokenizer, max_length, chunk=1000):
    """Every sample as a list of token ids ending in EOS, cut to max_length (one warning counts the cuts)."""
    eos, samples, cut, buf = tokenizer.eos_token_id, [], 0, []

    def flush():
        nonlocal cut
        for ids in tokenizer(buf)["input_ids"]:  # add_special_tokens: BOS where the model family uses one
            ids = ids + [eos] if not ids or ids[-1] != eos else ids
            cut += len(ids) > max_length
            samples.append(ids[:max_length])
        buf.clear()

    for text in iter_texts(paths):
        buf.append(text)
        if len(buf) == chunk:
            flush()
    flush()
    if cut and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(f"warning: {cut} of {len(samples)} samples are longer than max_length={max_length} tokens "
              "and were truncated (raise --max-length to keep them whole)", file=sys.stderr)
    return samples


def sample_indices(start, count, n, seed):
    """Sample indices at global positions [start, start+count) of the endless stream of seeded epochs.

    Epoch e visits all n samples in the order randperm(n) seeded with (seed, e); position p is sample
    order(p // n)[p % n]. A checkpoint stores only the position, so resuming never replays data.
    """
    out, p = [], start
    while p < start + count:
        epoch, i = divmod(p, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
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


def count_targets(batch):
    """Tokens that are predicted (the model shifts labels left by one inside its loss)."""
    return int((batch["labels"][:, 1:] != -100).sum())
