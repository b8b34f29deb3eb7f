"""Every bench in bench/ runs as committed: each starts here with its smallest settings on a tiny model, so a flag
that changes elsewhere breaks a test, not a figure nobody measures again. (gpu_check.py: tests/test_gpu_check.py.)"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, train

CHAT = ["--data", "data/chat.jsonl", "--max-length", "128", "--config-overrides",
        "{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 256}"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny plain-text model and a tiny chat model (ChatML template), trained once for this file."""
    root = tmp_path_factory.mktemp("bench")
    train(root / "plain", "--max-steps", "2")
    train(root / "chat", "--max-steps", "2", *CHAT)
    return root


def browser():
    return importlib.util.find_spec("selenium") and shutil.which("chromedriver")


# (bench, its smallest settings ({plain}, {chat}, {tmp} filled in), the package it needs or None)
BENCHES = {
    "activation_memory.py": (["--batch", "1", "--length", "32", "--layers", "2", "--steps", "1", "--cases", "a,b"], None),
    "chat_screenshot.py": (["--model", "{chat}", "--out", "{tmp}/chat.png", "--max-tokens", "4"], "selenium"),
    "compile_speed.py": (["--steps", "20", "--repeats", "1", "--model", "{{n_layer: 1, n_head: 2, n_embd: 32, "
                          "n_positions: 128}}"], None),
    "data_throughput.py": (["--gb", "0.002", "--slice-mb", "1", "--repeats", "1", "--work", "{tmp}"], "pyarrow"),
    "generate_throughput.py": (["--model", "{plain}", "--new-tokens", "4", "--batch", "2", "--repeats", "1"], None),
    "gguf_generate.py": (["--model", "{plain}", "--new-tokens", "4", "--repeats", "1"], "llama_cpp"),
    "grpo_step.py": (["--model", "{chat}", "--steps", "2", "--generations", "2", "--length", "8", "--work", "{tmp}"],
                     "trl"),
    "local_tasks.py": (["--text", "tests/data/train.txt", "--out", "{tmp}", "--docs", "5"], None),
    "lora_memory.py": (["--model", "{plain}", "--steps", "2", "--batch-sizes", "1", "--work", "{tmp}"], "peft"),
    "onnx_generate.py": (["--model", "{plain}", "--new-tokens", "4", "--repeats", "1"], "onnxruntime"),
    "packing_cost.py": (["--block", "32", "--batch", "2", "--steps", "2", "--repeats", "1"], None),
    "serve_load.py": (["--model", "{chat}", "--clients", "1,2", "--batch-sizes", "1", "--seconds", "1",
                       "--max-tokens", "4"], "openai"),
    "train_throughput.py": (["--cases", "gpt2-11m:1x32", "--recompute", "default", "--steps", "3", "--repeats", "1"],
                            "accelerate"),
}


def test_every_bench_is_listed_here():
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))}
    assert on_disk - {"gpu_check.py"} == set(BENCHES)


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_the_bench_runs_with_its_smallest_settings(bench, models, tmp_path):
    args, package = BENCHES[bench]
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{bench} needs {package}, which is not installed")
    if bench == "chat_screenshot.py" and not browser():
        pytest.skip("chat_screenshot.py needs Chromium (apt-get install chromium chromium-driver)")
    args = [a.format(plain=models / "plain", chat=models / "chat", tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, os.path.join("bench", bench), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.strip(), r.stderr[-2000:]  # it printed its figures
