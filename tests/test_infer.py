"""INFER.py: greedy output equals transformers' generate, stdout carries only the continuation."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run


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


def test_checkpoint_dir_works_as_model(trained):
    r = run("INFER.py", "--model", trained / "ckpt-step-3", "--prompt", "The", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.strip()


def test_empty_prompt_is_a_clear_error(trained):
    r = run("INFER.py", "--model", trained, stdin="")
    assert r.returncode == 2 and "empty prompt" in r.stderr and "Traceback" not in r.stderr
