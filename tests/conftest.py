import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

# The suite runs in two pytest workers (make test: -n 2) on small models: one thread per process (this one and
# every script it starts) instead of two workers' OpenMP pools spinning against each other on the same cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny.yaml")
sys.path.insert(0, ROOT)


def run(script, *args, stdin=None, timeout=300, env=None):
    """Run one of the project's scripts as a user would, from the repository root."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def train(out, *args, **kw):
    r = run("TRAIN.py", "--config", TINY, "--out", out, *args, **kw)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny model trained once for the whole session: OUT/ and OUT/ckpt-step-3, OUT/ckpt-step-6."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train(out)
    return out


def weights(path):
    """A saved model's tensors, by name."""
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def same_weights(a, b, rtol=0.0, atol=0.0):
    """Whether two saved models hold the same tensors: bit for bit by default, else to the tolerance."""
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=rtol, atol=atol) if rtol or atol
                                          else torch.equal(wa[k], wb[k]) for k in wa)


def reference_nll(path, texts):
    """(Σ NLL, scored tokens) of plain texts, each its tokens + EOS, one at a time, with transformers' own loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return nll, n



@contextlib.contextmanager
def serving(model, *flags, log=None):
    """`INFER.py --model MODEL --serve` on a free loopback port until the block ends: yields its base url. Eager
    decoding unless the flags say --decode (tests/test_decode.py serves compiled)."""
    flags = flags if "--decode" in flags else (*flags, "--decode", "eager")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "INFER.py", "--model", str(model), "--serve", "--port", str(port), *flags],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w") if log else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # 5 minutes: a compiled server compiles first
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, open(log).read() if log else "the server exited"
                time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            proc.wait(30)
            stopped = True
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped = False
    assert stopped, "the server did not stop within 30 s of Ctrl-C"


# Trained models for the export tests. 300 steps give the tiny models real preferences and varied greedy text:
# after 6, most next-token choices are near-ties that any rounding flips (which would measure the tie-breaking,
# not the export), and after 60 every prompt continues "eeee..."
TRAINED = ["--max-steps", "300", "--learning-rate", "3e-3", "--save-every", "0", "--eval-every", "0"]
LLAMA = ["--model", "llama", "--from-scratch", "--config-overrides",
         "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
         "num_key_value_heads: 1, max_position_embeddings: 128}"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny gpt2 and llama trained for TRAINED steps, once per test file: {"gpt2": dir, "llama": dir}."""
    root = tmp_path_factory.mktemp("export")
    train(root / "gpt2", *TRAINED)
    train(root / "llama", *TRAINED, *LLAMA)
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


def load(path):
    """A saved model, fp32, in eval mode."""
    from MODEL import load_pretrained
    return load_pretrained(str(path), torch.float32).eval()
