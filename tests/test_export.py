"""EXPORT.py: each format is written and verified in its own runtime, for gpt2 and llama architectures."""
import pytest

from conftest import run, train

LLAMA = ["--model", "llama", "--from-scratch", "--max-steps", "1", "--config-overrides",
         "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
         "num_key_value_heads: 1, max_position_embeddings: 128}"]


@pytest.fixture(scope="module")
def models(trained, tmp_path_factory):
    llama = tmp_path_factory.mktemp("llama") / "out"
    train(llama, *LLAMA)
    return {"gpt2": trained, "llama": llama}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_torchscript_is_verified_in_a_fresh_process(models, arch, tmp_path):
    r = run("EXPORT.py", "--model", models[arch], "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.pt").stat().st_size > 0
    assert "verified with torch.jit.load in a fresh process" in r.stderr and "<= 1e-05" in r.stderr


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_onnx_is_verified_with_onnxruntime(models, arch, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    r = run("EXPORT.py", "--model", models[arch], "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verified with onnxruntime" in r.stderr and "<= 1e-04" in r.stderr


def test_gguf_says_it_is_not_implemented(models, tmp_path):
    r = run("EXPORT.py", "--model", models["gpt2"], "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 2 and "not implemented yet" in r.stderr and "Traceback" not in r.stderr
