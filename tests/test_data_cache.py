"""Tokenize once, train many times: the token cache, packing, per-sample mode and validation."""
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from CONFIG import DataCfg
from DATA import load, spans, token_cache
from conftest import train


@pytest.fixture(scope="module")
def tok(trained):
    return AutoTokenizer.from_pretrained(trained)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_cache_is_reused_and_rebuilt_when_a_file_or_tokenizer_changes(tmp_path, tok, capsys):
    data = write(tmp_path / "a.txt", ["the cat sat", "a dog ran far away"])
    cache = str(tmp_path / "cache")
    tokens, ends = token_cache([data], tok, cache)
    assert "tokenized 2 documents" in capsys.readouterr().err
    again, _ = token_cache([data], tok, cache)
    assert "reusing token cache" in capsys.readouterr().err and np.array_equal(tokens, again)
    write(tmp_path / "a.txt", ["the cat sat", "a dog ran far away", "one more line"])
    _, ends3 = token_cache([data], tok, cache)
    assert "tokenized 3 documents" in capsys.readouterr().err and len(ends3) == 3
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.add_tokens(["<new>"])
    token_cache([data], tok2, cache)
    assert "tokenized 3 documents" in capsys.readouterr().err
    assert len([d for d in os.listdir(cache) if ".tmp-" not in d]) == 3


def test_cache_holds_every_document_with_eos(tmp_path, tok):
    lines = ["the cat sat", "a dog ran far away", "x"]
    tokens, ends = token_cache([write(tmp_path / "a.txt", lines)], tok, str(tmp_path / "c"))
    expected = [tok(t)["input_ids"] + [tok.eos_token_id] for t in lines]
    assert tokens.tolist() == sum(expected, []) and ends.tolist() == np.cumsum([len(e) for e in expected]).tolist()


@pytest.mark.parametrize("n_tokens, max_length", [(1000, 16), (10, 16), (17, 16), (16, 16), (2, 16)])
def test_packing_keeps_every_token(n_tokens, max_length):
    """Blocks overlap by one token, so every token but the first is a target exactly once, none dropped."""
    ends = np.array([3, 7, n_tokens]) if n_tokens > 7 else np.array([n_tokens])
    blocks = spans(ends, 0, len(ends), max_length, packing=True)
    assert blocks[0, 0] == 0 and blocks[-1, 1] == n_tokens
    assert all(b - a <= max_length for a, b in blocks)
    assert sum(b - a - 1 for a, b in blocks) == n_tokens - 1  # targets in = tokens out
    targets = [t for a, b in blocks for t in range(a + 1, b)]
    assert targets == list(range(1, n_tokens))


def test_per_sample_mode_is_one_truncated_sequence_per_document():
    ends = np.array([5, 30, 32])
    assert spans(ends, 0, 3, 10, packing=False).tolist() == [[0, 5], [5, 15], [30, 32]]


def test_validation_fraction_holds_out_the_last_documents(tmp_path, tok):
    data = write(tmp_path / "a.txt", [f"line number {i} of the file" for i in range(20)])
    cfg = DataCfg(files=[data], packing=False, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    tokens, train_spans, val_tokens, val_spans = load(cfg, tok, 64)
    assert len(train_spans) == 15 and len(val_spans) == 5
    assert val_spans[0, 0] == train_spans[-1, 1]  # disjoint, in file order


def test_validation_perplexity_is_exact_over_unequal_samples(tmp_path, trained):
    """TRAIN.py's val loss == Σ NLL / Σ targets computed with plain transformers over the same texts."""
    texts = ["the cat sat on the warm windowsill and watched the birds", "a dog", "once upon a time there was a fox",
             "bees carry pollen"]
    val = write(tmp_path / "val.txt", texts)
    out = tmp_path / "out"
    train(out, "--resume", trained / "ckpt-step-6", "--max-steps", "7", "--val-data", val, "--batch-size", "3")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val_loss = [r for r in rows if "val_loss" in r][-1]
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    nll = n = 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
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
    cache = tmp_path / "cache"
    first = train(tmp_path / "a", "--max-steps", "1", "--cache-dir", cache)
    second = train(tmp_path / "b", "--max-steps", "1", "--cache-dir", cache)
    assert "tokenized" in first.stderr and "training a byte-level BPE" in first.stderr
    assert "reusing token cache" in second.stderr and "reusing the BPE tokenizer" in second.stderr


def test_packed_training_runs_and_logs_token_counts(tmp_path):
    r = train(tmp_path / "out", "--max-steps", "2", "--packing")
    assert "packed blocks of <= 48 tokens" in r.stderr
