"""What training and validation iterate over: the token cache (DATA.py) cut into sequences of at most max_length
tokens (packing, truncation, the held-out part), their seeded order, and batches of tensors."""
import dataclasses
import functools

import numpy as np
import torch

from DATA import Corpus, token_cache
from REPORT import UserError, log


@dataclasses.dataclass(frozen=True)
class Sequences:
    """What training or validation iterates over: sequence i is the segments segments[offsets[i]:offsets[i+1]]
    of the corpus (token ranges, each a document or a piece of one) side by side, each seeing only itself."""
    corpus: Corpus        # DATA.token_cache
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


def pairs(corpus, max_length):
    """The Sequences of a corpus of preference pairs (documents 2i and 2i+1: the chosen and rejected answers of
    pair i, PREFERENCE.py): a pair a sequence of two segments, each truncated to max_length tokens."""
    segs = []
    for d in range(0, len(corpus.ends), 2):
        for doc in (d, d + 1):
            s = int(corpus.ends[doc - 1]) if doc else 0
            e = min(int(corpus.ends[doc]), s + max_length)
            if not corpus.mask[s + 1:e].any():
                raise UserError(f"preference pair {d // 2 + 1}: its {('chosen', 'rejected')[doc - d]} answer has no "
                                f"tokens within max_length={max_length} - raise --max-length or shorten the prompt")
            segs.append((s, e))
    segs = np.array(segs, dtype=np.int64)
    offsets = np.arange(0, len(segs) + 1, 2, dtype=np.int64)
    targets = np.array([int(corpus.mask[a + 1:b].sum()) for a, b in segs], dtype=np.int64)
    return Sequences(corpus, segs, offsets, np.add.reduceat(segs[:, 1] - segs[:, 0], offsets[:-1]),
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


def validation_subset(val, t):
    """The validation sequences a run scores each time: training.eval_batches batches of them, evenly spread."""
    indices = evenly_spaced(len(val), t.eval_batches * t.batch_size) if val else []
    if val and len(indices) < len(val):
        log(f"validation scores the same {len(indices)} of its {len(val)} sequences each time "
            f"(training.eval_batches {t.eval_batches} x batch_size {t.batch_size}); EVAL.py scores all")
    return indices


def load(dcfg, sources, tokenizer, max_length, preference=False):
    """(train Sequences, validation Sequences or None) for the data section of the config and its sources
    (DATA.sources: training, validation); preference: the data holds preference pairs (a pair a sequence, no
    validation)."""
    corpus = token_cache(sources[0], tokenizer, dcfg.cache_dir, dcfg.loss_on)
    if preference:
        train = pairs(corpus, max_length)
        log(f"data: {len(train)} preference pairs, {int(corpus.ends[-1])} tokens (no validation: DPO's progress "
            "is in rewards/accuracies and rewards/margins)")
        return train, None
    n_docs = len(corpus.ends)
    n_val = 0 if sources[1] else held_out(corpus.ends, dcfg.val_fraction, dcfg.val_max_tokens)
    if n_val == n_docs:
        raise UserError(f"data.val_fraction: {dcfg.val_fraction} leaves no training documents")
    val = None
    if sources[1]:
        val_corpus = token_cache(sources[1], tokenizer, dcfg.cache_dir, dcfg.loss_on)
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


@dataclasses.dataclass(frozen=True)
class Step:
    """What one optimizer step trains on, on this rank (an objective's prepare): its micro-batches (dicts of
    tensors on the device), the count its loss is a mean over (this rank's share of the global batch's: SFT's
    target tokens, DPO's pairs, GRPO's completion tokens), its tokens (for tokens/s) and the objective's
    statistics known before the forward (GRPO's rewards; zeros for the others)."""
    micro_batches: list
    count: torch.Tensor
    tokens: int
    stats: torch.Tensor


def micro_batches(seqs, idx, t, run, pad_id):
    """This rank's share of each micro-step of one optimizer step, collated: the global batch idx (the same list
    on every rank) is cut into t.grad_accum micro-steps of world x batch_size sequences. -> [(its indices,
    batch)]"""
    shares = [idx[(m * run.world + run.rank) * t.batch_size:][:t.batch_size] for m in range(t.grad_accum)]
    return [(share, collate(gather(seqs, share), pad_id)) for share in shares]


def on(run, batch):
    """A batch's tensors on the run's device."""
    return {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}


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
