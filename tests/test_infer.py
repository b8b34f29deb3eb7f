"""INFER.py: greedy output equals transformers' generate, stdout carries only the continuation."""
import json
import os
import pty
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, run


def reference_greedy(path, prompt, n):
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_greedy_matches_transformers_generate(trained):
    r = run("INFER.py", "--model", trained, "--prompt", "Once upon a time", "--greedy", "--max-new-tokens", "20")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == reference_greedy(trained, "Once upon a time", 20)


def test_stdin_is_the_prompt_and_stdout_is_only_the_continuation(trained):
    piped = run("INFER.py", "--model", trained, "--greedy", "--max-new-tokens", "12", stdin="Once upon a time\n")
    flag = run("INFER.py", "--model", trained, "--greedy", "--max-new-tokens", "12", "--prompt", "Once upon a time")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == flag.stdout and piped.stdout.strip()
    assert not piped.stdout.startswith("Once upon a time")


def test_seeded_sampling_is_reproducible(trained):
    a, b, c = (run("INFER.py", "--model", trained, "--prompt", "The", "--seed", s, "--max-new-tokens", "15")
               for s in (1, 1, 2))
    assert a.returncode == 0 and a.stdout == b.stdout
    assert a.stdout != c.stdout


def reference_sample(path, prompt, n, seed):
    """transformers' seeded sampling with INFER.py's default settings (temperature 0.8, top-k 50)."""
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=True, temperature=0.8,
                         top_k=50, top_p=1.0, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_checkpoint_dir_generates_as_that_checkpoint(trained):
    """INFER.py on OUT/ckpt-step-3 samples what transformers samples from that directory with the same seed,
    which is not what the final model in OUT/ samples."""
    r = run("INFER.py", "--model", trained / "ckpt-step-3", "--each-line", "--jsonl", "--seed", "1",
            "--max-new-tokens", "20", stdin="Once upon a time\n")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["completion"]
    assert got == reference_sample(trained / "ckpt-step-3", "Once upon a time", 20, seed=1)
    assert got != reference_sample(trained, "Once upon a time", 20, seed=1)


def test_empty_prompt_is_a_clear_error(trained):
    r = run("INFER.py", "--model", trained, stdin="")
    assert r.returncode == 2 and "empty prompt" in r.stderr and "Traceback" not in r.stderr


def test_each_line_batched_equals_one_by_one(trained):
    prompts = "Once upon a time\nThe cat sat on\nA\nThe little robot lived in a busy\n"
    batched = run("INFER.py", "--model", trained, "--each-line", "--greedy", "--batch-size", "4",
                  "--max-new-tokens", "12", stdin=prompts)
    single = run("INFER.py", "--model", trained, "--each-line", "--greedy", "--batch-size", "1",
                 "--max-new-tokens", "12", stdin=prompts)
    assert batched.returncode == 0, batched.stderr
    assert batched.stdout == single.stdout and len(batched.stdout.splitlines()) == 4
    first = run("INFER.py", "--model", trained, "--greedy", "--max-new-tokens", "12", "--prompt", "Once upon a time")
    assert batched.stdout.splitlines()[0] == first.stdout.rstrip("\n").replace("\n", " ")


def test_jsonl_mode_writes_one_object_per_prompt(trained):
    r = run("INFER.py", "--model", trained, "--each-line", "--jsonl", "--greedy", "--max-new-tokens", "6",
            stdin="Once upon a time\n\nThe\n")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == ["Once upon a time", "", "The"]
    assert rows[1]["completion"] == "" and rows[1]["completion_tokens"] == 0
    tok = AutoTokenizer.from_pretrained(trained)
    assert rows[0]["prompt_tokens"] == len(tok("Once upon a time")["input_ids"])
    assert 0 < rows[0]["completion_tokens"] <= 6 and rows[0]["completion"] == reference_greedy(trained, "Once upon a time", 6)


def test_stop_string_ends_generation_and_is_not_printed(trained):
    full = run("INFER.py", "--model", trained, "--greedy", "--max-new-tokens", "30", "--prompt", "Once upon a time")
    text = full.stdout.rstrip("\n")
    stop = text[len(text) // 2:len(text) // 2 + 3]  # three characters from the middle of the greedy text
    r = run("INFER.py", "--model", trained, "--greedy", "--max-new-tokens", "30", "--prompt", "Once upon a time",
            "--stop", stop, "--stop", "never-generated-zzz")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == text[:text.find(stop)]


def test_chat_applies_the_template(trained, tmp_path):
    model_dir = tmp_path / "chat"
    shutil.copytree(trained, model_dir, ignore=shutil.ignore_patterns("ckpt-*"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    tok.save_pretrained(model_dir)
    r = run("INFER.py", "--model", model_dir, "--chat", "--system", "Be kind.", "--prompt", "Hello",
            "--greedy", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == reference_greedy(model_dir, "system: Be kind.\nuser: Hello\nassistant:", 8)


def test_chat_without_template_is_a_clear_error(trained):
    r = run("INFER.py", "--model", trained, "--chat", "--prompt", "Hello")
    assert r.returncode == 2 and "has no chat template" in r.stderr and "Traceback" not in r.stderr


def test_interactive_loop_at_a_terminal(trained):
    """With a terminal on stdin and no prompt: a "> " loop, one answer per line, until EOF."""
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "INFER.py", "--model", str(trained), "--greedy", "--max-new-tokens", "5"],
                            cwd=ROOT, stdin=child, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(child)
    os.write(main, b"Once upon a time\n")
    os.write(main, b"\x04")  # Ctrl-D: end of input
    out, err = proc.communicate(timeout=120)
    os.close(main)
    assert proc.returncode == 0, err
    assert err.count("> ") >= 2 and "Ctrl-D" in err
    assert out.rstrip("\n") == reference_greedy(trained, "Once upon a time", 5)


@pytest.mark.parametrize("text, stops, prefix, expected", [
    ("Hello. World", ["."], "", ("Hello", True)),
    ("Hello World", ["."], "", ("Hello World", False)),
    ("ab User: x", ["User:", "ab"], "", ("", True)),               # the earliest stop wins
    ("er: hi", ["User:"], "Us", ("", True)),                      # a stop that began in the prompt
    ("ooot", ["\n"], "assistant\n", ("ooot", False)),             # one wholly in the prompt is not a stop
    ("ab\ncd", ["\n"], "x\n", ("ab", True)),
    ("no stop", [], "", ("no stop", False)),
])
def test_cut_at_stop(text, stops, prefix, expected):
    from GENERATE import cut_at_stop
    assert cut_at_stop(text, stops, prefix) == expected


@pytest.mark.parametrize("text, stops, expected", [
    ("Hello Us", ["User:"], 2), ("Hello User", ["User:"], 4), ("Hello", ["User:"], 0), ("a<|im", ["<|im_end|>"], 4),
    ("x", [], 0),
])
def test_held_back_is_what_could_begin_a_stop_string(text, stops, expected):
    from GENERATE import held_back
    assert held_back(text, stops) == expected


@pytest.mark.parametrize("n_ids, max_new, context, kept, new", [
    (10, 20, 100, 10, 20), (90, 20, 100, 80, 20), (10, 500, 100, 1, 99), (100, 1, 100, 99, 1),
])
def test_fit_context_keeps_the_prompts_tail(n_ids, max_new, context, kept, new):
    from GENERATE import fit_context
    ids, max_new_tokens = fit_context(list(range(n_ids)), max_new, context, warned=[True])
    assert (len(ids), max_new_tokens) == (kept, new) and ids == list(range(n_ids))[-kept:]


def test_rows_answered_together_are_the_rows_answered_alone(trained):
    """GENERATE.generate with rows of their own lengths, budgets and stop strings: greedy, each row's answer is
    the one it gets alone (the server batches requests this way)."""
    import GENERATE
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(trained).eval(), AutoTokenizer.from_pretrained(trained)
    greedy = GENERATE.sampling_of(True, 0, 0, 1)
    asks = [("Once upon a time", 20, []), ("The cat sat on", 7, []), ("A", 30, ["e"]), ("The little robot lived", 12, [" the"]),
            ("Every day", 1, []), ("The fox", 25, ["ee"]), ("She", 16, []), ("Once", 9, ["a"])]
    rows = lambda: [GENERATE.Row(tok(p)["input_ids"], GENERATE.Options(n, greedy, stops, [tok.eos_token_id]))  # noqa: E731
                    for p, n, stops in asks]
    together = GENERATE.generate(model, tok, rows())
    alone = [GENERATE.generate(model, tok, [row])[0] for row in rows()]
    assert [(r.text, r.n_tokens, r.ended) for r in together] == [(r.text, r.n_tokens, r.ended) for r in alone]
    assert all(r.n_tokens <= n for r, (_, n, _) in zip(together, asks)) and any(r.ended for r in together)
