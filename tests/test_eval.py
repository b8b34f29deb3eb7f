"""EVAL.py: perplexity equals an independent computation with plain transformers; sliding windows; dumps; plots."""
import json
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from EVAL import windows
from conftest import run, reference_nll

TEXTS = ["Once upon a time, a small fox lived at the edge of a quiet forest.", "The cat sat.",
         "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.", "A"]


def metrics(stdout):
    return {k: float(v) for k, v in (line.split() for line in stdout.splitlines())}


@pytest.fixture
def texts_file(tmp_path):
    p = tmp_path / "eval.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return p


def test_perplexity_equals_exp_of_total_nll_over_total_tokens(trained, texts_file):
    r = run("EVAL.py", "--model", trained, "--data", texts_file, "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    m = metrics(r.stdout)
    nll, n = reference_nll(trained, TEXTS)
    assert m["tokens"] == n
    assert m["nll_per_token"] == pytest.approx(nll / n, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(len(t.encode()) for t in TEXTS), rel=1e-5)


def test_windows_score_every_token_once():
    for n, window, stride in [(10, 4, 2), (10, 4, 4), (3, 8, 8), (17, 5, 3)]:
        spans = windows(n, window, stride)
        scored = [i for begin, end, k in spans for i in range(end - k, end)]
        assert scored == list(range(n))
        assert all(end - begin <= window for begin, end, _ in spans)


def test_sliding_window_keeps_token_count_and_uses_context(trained, texts_file, tmp_path):
    full = metrics(run("EVAL.py", "--model", trained, "--data", texts_file).stdout)
    slid = run("EVAL.py", "--model", trained, "--data", texts_file, "--window", "8", "--stride", "4",
               "--dump", tmp_path / "d.jsonl")
    assert slid.returncode == 0, slid.stderr
    assert metrics(slid.stdout)["tokens"] == full["tokens"]
    rows = [json.loads(line) for line in open(tmp_path / "d.jsonl")]
    tok = AutoTokenizer.from_pretrained(trained)
    assert [r["tokens"] for r in rows] == [(tok(t)["input_ids"] + [tok.eos_token_id])[1:] for t in TEXTS]
    assert -sum(sum(r["logprobs"]) for r in rows) / full["tokens"] == pytest.approx(
        metrics(slid.stdout)["nll_per_token"], rel=1e-4)


def test_dump_npy_and_top_k(trained, texts_file, tmp_path):
    r = run("EVAL.py", "--model", trained, "--data", texts_file, "--dump", tmp_path / "lp.npy")
    lp = np.load(tmp_path / "lp.npy")
    assert lp.shape == (metrics(r.stdout)["tokens"],)
    assert -lp.sum() / len(lp) == pytest.approx(metrics(r.stdout)["nll_per_token"], rel=1e-4)
    run("EVAL.py", "--model", trained, "--data", texts_file, "--dump", tmp_path / "k.jsonl", "--dump-top-k", "3")
    row = json.loads(open(tmp_path / "k.jsonl").readline())
    assert len(row["top_k"]) == len(row["tokens"]) and all(len(k) == 3 for k in row["top_k"])
    assert all(k[0][1] >= lp_ for k, lp_ in zip(row["top_k"], row["logprobs"]))  # top-1 is at least the target


def test_eval_reports_data_errors_like_train(trained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    r = run("EVAL.py", "--model", trained, "--data", bad)
    assert r.returncode == 2 and f"{bad}:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr


def test_plot_writes_loss_png(trained):
    pytest.importorskip("matplotlib")
    r = run("EVAL.py", "--plot", trained)
    assert r.returncode == 0, r.stderr
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_one_line_hint(trained, tmp_path):
    (tmp_path / "matplotlib").mkdir()  # a package that shadows matplotlib and fails to import, as if absent
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    r = run("EVAL.py", "--plot", trained, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2 and "pip install matplotlib" in r.stderr and "Traceback" not in r.stderr
