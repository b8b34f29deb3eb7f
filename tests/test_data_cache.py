"""Tokenize once, train many times: the token cache, packing, per-sample mode and validation."""
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from BATCHES import gather, load, sequences
from CONFIG import DataCfg
from DATA import Corpus, local, sources, token_cache
from conftest import ROOT, reference_nll, train


@pytest.fixture(scope="module")
def tok(trained):
    return AutoTokenizer.from_pretrained(trained)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_cache_is_reused_and_rebuilt_when_a_file_or_tokenizer_changes(tmp_path, tok, capsys):
    data = write(tmp_path / "a.txt", ["the cat sat", "a dog ran far away"])
    cache = str(tmp_path / "cache")
    first = token_cache(local([data]), tok, cache)
    assert "tokenized 2 documents" in capsys.readouterr().err
    again = token_cache(local([data]), tok, cache)
    assert "reusing token cache" in capsys.readouterr().err and np.array_equal(first.tokens, again.tokens)
    write(tmp_path / "a.txt", ["the cat sat", "a dog ran far away", "one more line"])
    third = token_cache(local([data]), tok, cache)
    assert "tokenized 3 documents" in capsys.readouterr().err and len(third.ends) == 3
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.add_tokens(["<new>"])
    token_cache(local([data]), tok2, cache)
    assert "tokenized 3 documents" in capsys.readouterr().err
    assert len([d for d in os.listdir(cache) if ".tmp-" not in d]) == 3


def test_cache_holds_every_document_with_eos_and_its_targets(tmp_path, tok):
    lines = ["the cat sat", "a dog ran far away", "x"]
    c = token_cache(local([write(tmp_path / "a.txt", lines)]), tok, str(tmp_path / "c"))
    expected = [tok(t)["input_ids"] + [tok.eos_token_id] for t in lines]
    assert c.tokens.tolist() == sum(expected, []) and c.ends.tolist() == np.cumsum([len(e) for e in expected]).tolist()
    assert c.mask.tolist() == sum(([0] + [1] * (len(e) - 1) for e in expected), [])  # all but a document's first
    assert not c.whole.any()  # plain text may be cut into pieces when packed


def corpus(lengths, whole=False):
    """Tokens numbered by position, plain-text targets (all but each document's first token)."""
    ends = np.cumsum(lengths)
    mask = np.ones(ends[-1], dtype=np.uint8)
    mask[np.concatenate([[0], ends[:-1]])] = 0
    return Corpus(np.arange(ends[-1]), mask, ends, np.full(len(lengths), whole))


@pytest.mark.parametrize("lengths, max_length", [([3, 4, 993], 16), ([10], 16), ([3, 4, 10], 16), ([16], 16),
                                                 ([2], 16), ([5, 5, 5, 5, 5], 12), ([20, 3, 30], 8)])
def test_packing_keeps_every_target_once_and_documents_whole(lengths, max_length):
    """Documents fill blocks of <= max_length side by side, never split unless longer than a block (then in
    pieces overlapping by one token), so every token but a document's first is a target exactly once."""
    c = corpus(lengths)
    seqs = sequences(c, 0, len(lengths), max_length, packing=True)
    rows = gather(seqs, range(len(seqs)))
    assert all(len(ids) <= max_length for ids, _, _ in rows)
    targets = sorted(int(t) for _, labels, _ in rows for t in labels if t != -100)
    assert targets == [i for i in range(c.ends[-1]) if c.mask[i]]
    assert seqs.targets.tolist() == [int((labels != -100).sum()) for _, labels, _ in rows]
    seen = {}  # token -> [(row, position)]
    for row, (ids, _, positions) in enumerate(rows):
        for t, p in zip(ids.tolist(), positions.tolist()):
            seen.setdefault(t, []).append((row, p))
    for start, n in zip([0, *c.ends[:-1]], lengths):  # a document that fits a block is in one row, from position 0
        if n <= max_length:
            row = seen[start][0][0]
            assert [seen[t] for t in range(start, start + n)] == [[(row, k)] for k in range(n)]


def test_per_sample_mode_is_one_truncated_sequence_per_document():
    seqs = sequences(corpus([5, 25, 2]), 0, 3, 10, packing=False)
    assert seqs.segments.tolist() == [[0, 5], [5, 15], [30, 32]] and seqs.offsets.tolist() == [0, 1, 2, 3]
    assert sequences(corpus([5, 25, 2]), 0, 3, 10, packing=False, too_long="drop").segments.tolist() == [[0, 5], [30, 32]]


def test_validation_fraction_holds_out_the_last_documents(tmp_path, tok):
    data = write(tmp_path / "a.txt", [f"line number {i} of the file" for i in range(20)])
    cfg = DataCfg(files=[data], packing=False, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    train_seqs, val_seqs = load(cfg, sources(cfg), tok, 64)
    assert len(train_seqs) == 15 and len(val_seqs) == 5
    assert val_seqs.segments[0, 0] == train_seqs.segments[-1, 1]  # disjoint, in file order


def test_validation_perplexity_is_exact_over_unequal_samples(tmp_path, trained):
    """TRAIN.py's val loss == Σ NLL / Σ targets computed with plain transformers over the same texts."""
    texts = ["the cat sat on the warm windowsill and watched the birds", "a dog", "once upon a time there was a fox",
             "bees carry pollen"]
    val = write(tmp_path / "val.txt", texts)
    out = tmp_path / "out"
    train(out, "--resume", trained / "ckpt-step-6", "--max-steps", "7", "--val-data", val, "--batch-size", "3")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val_loss = [r for r in rows if "val_loss" in r][-1]
    nll, n = reference_nll(out, texts)
    assert val_loss["val_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert val_loss["val_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_save_best_keeps_the_lowest_validation_checkpoint(tmp_path):
    out = tmp_path / "out"
    r = train(out, "--max-steps", "6", "--val-fraction", "0.1", "--eval-every", "2", "--save-best")
    vals = [json.loads(line) for line in open(out / "metrics.jsonl") if "val_loss" in line]
    assert [v["step"] for v in vals] == [2, 4, 6] and "validation loss" in r.stderr
    best = min(vals, key=lambda v: v["val_loss"])
    state = torch.load(out / "ckpt-best" / "training_state.pt", weights_only=True)
    assert state["step"] == best["step"] and state["best_val"] == pytest.approx(best["val_loss"])


def test_second_run_reuses_the_cache(tmp_path):
    """The second run reads the tokens and the BPE the first one wrote: nothing in the cache is written again."""
    cache = tmp_path / "cache"

    def files():
        return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    first = train(tmp_path / "a", "--max-steps", "1", "--cache-dir", cache)
    written = files()
    second = train(tmp_path / "b", "--max-steps", "1", "--cache-dir", cache)
    assert any(n.endswith("tokens.bin") for n in written) and any(n.endswith("tokenizer.json") for n in written)
    assert files() == written
    assert "reusing token cache" in second.stderr and "reusing the BPE tokenizer" in second.stderr
    assert "tokenized" in first.stderr


def test_packed_training_puts_several_documents_in_each_sequence(tmp_path):
    """--packing: each of a step's batch_size x grad_accum sequences (4 x 2) of at most max_length tokens (48)
    holds several short documents, so a step trains on several times the tokens of one document per sequence."""
    words = open(os.path.join(ROOT, "tests/data/train.txt")).read().split()
    data = tmp_path / "short.txt"
    data.write_text("\n".join(" ".join(words[i:i + 3]) for i in range(0, 3 * 400, 3)) + "\n")

    def tokens_per_step(*args):
        train(tmp_path / "out", "--data", data, "--max-steps", "3", "--log-every", "1", "--overwrite",
              "--cache-dir", tmp_path / "cache", *args)
        rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl") if "tokens_per_s" in line]
        return [round(r["tokens_per_s"] * (r["prepare_s"] + r["train_s"])) for r in rows]
    packed, apart = tokens_per_step("--packing"), tokens_per_step("--no-packing")
    assert all(3 * a < p <= 4 * 2 * 48 for p, a in zip(packed, apart)), (packed, apart)



def test_the_cache_tokenizes_as_transformers_does_when_the_tokenizer_file_sets_truncation(tmp_path, tok):
    """The cache encodes with the tokenizers library directly; a tokenizer.json that truncates (as some models'
    do) is encoded as transformers encodes it, whole."""
    texts = ["the cat sat on the mat and then it sat on the mat again " * 4, "a dog"]
    truncating = AutoTokenizer.from_pretrained(tok.name_or_path)
    truncating.backend_tokenizer.enable_truncation(8)
    c = token_cache(local([write(tmp_path / "a.txt", texts)]), truncating, str(tmp_path / "c"))
    expected = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert len(expected[0]) > 9 and c.tokens.tolist() == sum(expected, [])
