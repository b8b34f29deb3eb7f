"""LoRA through peft: only adapters train, adapters load everywhere, merge is exact, resume is exact."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run, train

peft = pytest.importorskip("peft")
LORA = ["--lora", "--lora-r", "4", "--learning-rate", "1e-2", "--warmup-steps", "0", "--max-steps", "12"]


@pytest.fixture(scope="module")
def adapter(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    r = train(out, "--model", trained, *LORA, "--save-every", "6", "--merge", "--log-every", "1")
    assert "trainable" in r.stderr
    return out


def test_only_adapter_weights_change(adapter, trained):
    base = AutoModelForCausalLM.from_pretrained(trained)
    tuned = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained), adapter)
    tuned_base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in tuned.state_dict().items() if "lora_" not in k}
    for k, v in base.state_dict().items():
        assert torch.equal(v, tuned_base[k]), k
    lora_b = [v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it was trained
    assert json.load(open(adapter / "adapter_config.json"))["base_model_name_or_path"] == str(trained)


def test_loss_goes_down(adapter, trained):
    def nll(model):  # on fixed text, so batch-to-batch noise does not decide
        r = run("EVAL.py", "--model", model, "--data", "tests/data/train.jsonl")
        assert r.returncode == 0, r.stderr
        return float(r.stdout.split("nll_per_token")[1].split()[0])
    assert nll(adapter) < nll(trained)


def test_adapter_directory_loads_in_infer_and_eval(adapter, trained):
    g = run("INFER.py", "--model", adapter, "--prompt", "Once upon a time", "--greedy", "--max-new-tokens", "8")
    assert g.returncode == 0 and g.stdout.strip(), g.stderr
    merged = run("INFER.py", "--model", adapter / "merged", "--prompt", "Once upon a time", "--greedy",
                 "--max-new-tokens", "8")
    assert merged.stdout == g.stdout
    e = run("EVAL.py", "--model", adapter, "--data", "tests/data/train.txt", "--base-model", trained)
    assert e.returncode == 0 and "perplexity" in e.stdout, e.stderr


def test_merged_model_is_plain_and_gives_the_same_logits(adapter, trained):
    assert not (adapter / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(adapter / "merged").eval()
    unmerged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained), adapter).eval()
    ids = AutoTokenizer.from_pretrained(adapter)("Once upon a time, a small fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=0, atol=1e-5)


def test_adapter_exports_to_gguf_merged(adapter, tmp_path):
    pytest.importorskip("gguf")
    from MODEL import load_pretrained
    r = run("EXPORT.py", "--model", adapter, "--format", "gguf", "--quant", "f32", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0, r.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(adapter / "merged").state_dict()
    exported = load_pretrained(str(tmp_path / "m.gguf"), torch.float32).state_dict()
    for name, w in merged.items():
        torch.testing.assert_close(exported[name], w, rtol=0, atol=1e-6, msg=name)


def test_lora_resume_is_bit_identical(adapter, trained, tmp_path):
    train(tmp_path / "resumed", "--model", trained, *LORA, "--resume", adapter / "ckpt-step-6")
    a = load_file(str(adapter / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_on_cpu_is_a_clear_error(trained, tmp_path):
    r = run("TRAIN.py", "--config", "tests/tiny.yaml", "--model", trained, "--qlora", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--qlora needs a CUDA GPU" in r.stderr and "--lora works here" in r.stderr
    assert "Traceback" not in r.stderr


def test_lora_on_a_scratch_model_is_a_clear_error(tmp_path):
    r = run("TRAIN.py", "--config", "tests/tiny.yaml", "--lora", "--out", tmp_path / "o")
    assert r.returncode == 2 and "adapts a pretrained model" in r.stderr


@pytest.mark.parametrize("arch, kw, projections", [
    ("gpt2", dict(n_layer=1, n_head=2, n_embd=16), {"c_attn", "c_proj", "c_fc"}),
    ("llama", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
     {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_all_linear_adapts_the_attention_and_mlp_projections(arch, kw, projections):
    """peft's all-linear, the default, adapts exactly the projections a hand-kept per-architecture table named
    (attention and MLP), and never the output head."""
    from transformers import AutoConfig
    from CONFIG import LoraCfg
    from LORA import add_lora
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=64, **kw))
    adapted = {name.split(".")[-4] for name, _ in add_lora(model, LoraCfg(enabled=True), "base").named_parameters()
               if "lora_A" in name}
    assert adapted == projections
