"""--dtype int8 (QUANT.py): int8 weights with a scale per output row, multiplied with bf16 activations by PyTorch's
own kernel; accepted by INFER.py, EVAL.py and the server where the CPU has native bf16, refused in one line where
it cannot run."""
import json
import urllib.request

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import DEVICE
import QUANT
from conftest import run, serving

native = pytest.mark.skipif(not DEVICE.cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")


@native
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_an_int8_layer_computes_with_its_rounded_weights(kind):
    """The layer's output is x times its weights rounded to int8 steps of the row's largest / 127 (bf16 sums);
    its weights are int8, a quarter of fp32's bytes."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 48) if kind == "linear" else Conv1D(48, 64)
    weight = layer.weight.detach() if kind == "linear" else layer.weight.detach().T  # (out, in)
    model = QUANT.to_int8(nn.Sequential(layer), torch.bfloat16)
    int8 = model[0]
    assert isinstance(int8, QUANT.Int8Linear) and int8.weight.dtype == torch.int8 and int8.weight.shape == (48, 64)
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    rounded = torch.round(weight / step) * step
    x = torch.randn(3, 5, 64)
    want = x @ rounded.T + layer.bias.detach()
    got = int8(x.to(torch.bfloat16)).float()
    assert got.shape == (3, 5, 48)
    assert torch.allclose(got, want, atol=0.05, rtol=0.02)  # bf16 activations and sums: ~3 significant digits
    assert not torch.allclose(got, x @ weight.T + layer.bias.detach(), atol=1e-4)  # it is not the fp32 layer


@native
def test_infer_eval_and_the_server_accept_int8(trained, tmp_path):
    r = run("INFER.py", "--model", trained, "--dtype", "int8", "--greedy", "--prompt", "Once upon a time",
            "--max-new-tokens", "12")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    ppl = {}
    for dtype in ("float32", "int8"):
        r = run("EVAL.py", "--model", trained, "--dtype", dtype, "--data", "tests/data/train.txt")
        assert r.returncode == 0, r.stderr
        ppl[dtype] = float(dict(line.split() for line in r.stdout.splitlines())["perplexity"])
    assert ppl["int8"] != ppl["float32"] and abs(ppl["int8"] / ppl["float32"] - 1) < 0.02  # close, not the same
    with serving(trained, "--dtype", "int8") as url:
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}).encode()
        answer = json.load(urllib.request.urlopen(urllib.request.Request(
            url + "/v1/completions", body, {"Content-Type": "application/json"})))
    r = run("INFER.py", "--model", trained, "--dtype", "int8", "--greedy", "--prompt", "Once upon a time",
            "--max-new-tokens", "12")
    assert answer["choices"][0]["text"] == r.stdout[:-1]


@pytest.mark.parametrize("script, args", [
    ("TRAIN.py", ["--config", "tests/tiny.yaml", "--max-steps", "1"]),
    ("EXPORT.py", ["--model", "{trained}", "--format", "gguf"]),
])
def test_int8_is_refused_in_one_line_where_it_cannot_run(script, args, trained, tmp_path):
    r = run(script, *[str(a).format(trained=trained) for a in args], "--dtype", "int8", "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --dtype int8 is for INFER.py and EVAL.py")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(DEVICE.cpu_has_native_bf16(), reason="this CPU has native bf16: int8 runs here")
@pytest.mark.parametrize("script, args", [
    ("INFER.py", ["--prompt", "Once"]),
    ("INFER.py", ["--serve", "--port", "18765"]),  # refused as it loads, before it listens
    ("EVAL.py", ["--data", "tests/data/train.txt"]),
])
def test_int8_is_refused_in_one_line_on_a_cpu_without_native_bf16(script, args, trained):
    r = run(script, "--model", trained, *args, "--dtype", "int8", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("error: --dtype int8 multiplies int8 weights with bf16")
