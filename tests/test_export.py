"""EXPORT.py: each format is written and verified in its own runtime, for gpt2 and llama architectures."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, load, run

ARCHS, QUANTS = ["gpt2", "llama"], ["f32", "f16", "q8_0"]
PROMPTS = ["It is a truth", "The weather", "She said"]
# the share of next-token choices llama.cpp must make as PyTorch does: q8_0's rounding moves more of a 2-layer
# model's near ties (98.1% for the GPT-2 here, llama.cpp 0.3.36) than f16's
AGREEMENT = {"f16": 0.99, "q8_0": 0.95}


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    """Every architecture x weight type, exported once: {(arch, quant): (path, stderr)}."""
    pytest.importorskip("gguf", reason="GGUF export needs the gguf package")
    root, out = tmp_path_factory.mktemp("gguf"), {}
    for arch in ARCHS:
        for quant in QUANTS:
            path = root / f"{arch}-{quant}.gguf"
            r = run("EXPORT.py", "--model", models[arch], "--format", "gguf", "--quant", quant, "--out", path,
                    *(["--min-agreement", str(AGREEMENT[quant])] if quant in AGREEMENT else []))
            assert r.returncode == 0, r.stderr[-3000:]
            out[arch, quant] = path, r.stderr
    return out


def llama_cpp_model(path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_torchscript_reloads_and_computes_the_models_logits(models, arch, tmp_path):
    r = run("EXPORT.py", "--model", models[arch], "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert r.returncode == 0, r.stderr
    module = torch.jit.load(str(tmp_path / "m.pt"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.allclose(module(ids, torch.ones_like(ids)), load(models[arch])(ids).logits, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_pt2_is_verified_in_a_fresh_process(models, arch, tmp_path):
    r = run("EXPORT.py", "--model", models[arch], "--format", "pt2", "--out", tmp_path / "m.pt2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verified: torch.export.load in a fresh process" in r.stderr and "<= 1e-05" in r.stderr
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.allclose(program(ids, torch.ones_like(ids)), load(models[arch])(ids).logits, atol=1e-5)


def test_torchscript_says_it_is_deprecated_and_what_replaces_it(models, tmp_path):
    r = run("EXPORT.py", "--model", models["gpt2"], "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert r.returncode == 0 and "TorchScript (torch.jit) is deprecated" in r.stderr and "--format pt2" in r.stderr


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", QUANTS)
def test_gguf_holds_each_weight_in_the_type_asked_for(models, ggufs, arch, quant):
    """Matrices in the --quant type (q8_0 where rows split into blocks of 32, else f16), vectors and position
    embeddings in f32, as llama.cpp's converter writes them; every weight of the model is there."""
    gguf = pytest.importorskip("gguf")
    path, stderr = ggufs[arch, quant]
    assert f"wrote {path} (" in stderr
    T, kinds = gguf.GGMLQuantizationType, {}
    for t in gguf.GGUFReader(str(path)).tensors:
        matrix = len(t.shape) >= 2 and not t.name.startswith("position_embd")
        want = T.F32 if quant == "f32" or not matrix else \
            T.Q8_0 if quant == "q8_0" and int(t.shape[0]) % 32 == 0 else T.F16
        assert t.tensor_type == want, (t.name, t.tensor_type, want)
        kinds[matrix] = kinds.get(matrix, 0) + 1
    n_layer = load(models[arch]).config.num_hidden_layers
    assert kinds[True] >= 4 * n_layer and kinds[False] >= 2 * n_layer  # the layers' matrices and norms


def test_gguf_names_the_pre_tokenizer_llama_cpp_should_use():
    pytest.importorskip("gguf")  # GGUF.py needs the optional gguf package
    from GGUF import pre_tokenizer
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    llama3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
              "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    split = {"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated", "invert": False}
    assert pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    assert pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}}) == "smollm"
    assert pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        split, {**byte_level, "use_regex": False}]}}) == "llama-bpe"
    assert pre_tokenizer({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}}) is None
    assert pre_tokenizer({"pre_tokenizer": {**byte_level, "add_prefix_space": True}}) is None


def test_gguf_gets_smaller_with_each_weight_type(ggufs):
    for arch in ARCHS:
        f32, f16, q8 = (os.path.getsize(ggufs[arch, q][0]) for q in QUANTS)
        assert f32 > f16 > q8


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_f32_reads_back_in_transformers_bit_for_bit(models, ggufs, arch):
    original, back = load(models[arch]).state_dict(), load(ggufs[arch, "f32"][0]).state_dict()
    assert original.keys() == back.keys()
    for name in original:
        assert torch.equal(original[name], back[name]), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_quantised_weights_are_within_one_rounding_step(models, ggufs, arch, quant):
    original, back = load(models[arch]).state_dict(), load(ggufs[arch, quant][0]).state_dict()
    changed = 0
    for name, w in original.items():
        err = (back[name] - w).abs().max()
        if w.dim() < 2 or "wpe" in name:  # norms, biases, position embeddings are stored in f32
            assert err == 0, name
            continue
        # f16 keeps 11 significant bits; q8_0 rounds each block of 32 to 1/127 of its largest |value| (half a
        # step), with that scale itself stored in f16 (up to 127 x 2^-11 of a step more)
        step = w.abs().max() * (2 ** -11 if quant == "f16" else (0.5 + 127 * 2 ** -11) / 127)
        assert err <= step * 1.001, (name, float(err), float(step))
        changed += err > 0
    assert changed > 0  # the weights really were stored at lower precision


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_embeds_the_tokenizer(models, ggufs, arch):
    from TOKENIZER import load_tokenizer
    mine, embedded = load_tokenizer(str(models[arch])), load_tokenizer(str(ggufs[arch, "q8_0"][0]))
    texts = open(os.path.join(ROOT, "tests", "data", "train.txt")).read().splitlines()[:50] + ["x <|endoftext|> y 12345"]
    assert [embedded(t).input_ids for t in texts] == [mine(t).input_ids for t in texts]
    assert (embedded.eos_token_id, len(embedded)) == (mine.eos_token_id, len(mine))


def test_gguf_model_generates_like_its_source_in_infer(models, ggufs):
    args = ["--prompt", "It is a truth", "--greedy", "--max-new-tokens", "20"]
    from_dir, from_gguf = run("INFER.py", "--model", models["llama"], *args), \
        run("INFER.py", "--model", ggufs["llama", "f32"][0], *args)
    assert from_gguf.returncode == 0, from_gguf.stderr
    assert from_gguf.stdout == from_dir.stdout and from_dir.stdout.strip()


def test_gguf_model_scores_like_its_source_in_eval(models, ggufs):
    from_dir = run("EVAL.py", "--model", models["gpt2"], "--data", "tests/data/train.jsonl")
    from_gguf = run("EVAL.py", "--model", ggufs["gpt2", "f32"][0], "--data", "tests/data/train.jsonl")
    assert from_gguf.returncode == 0, from_gguf.stderr
    assert from_gguf.stdout == from_dir.stdout and "perplexity" in from_dir.stdout


def test_training_starts_from_a_gguf_and_saves_a_plain_model(ggufs, tmp_path):
    r = run("TRAIN.py", "--config", "tests/tiny.yaml", "--model", ggufs["llama", "q8_0"][0], "--out", tmp_path / "ft",
            "--max-steps", "2", "--save-every", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.load(open(tmp_path / "ft" / "config.json"))
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (tmp_path / "ft" / "model.safetensors").exists()


def test_without_llama_cpp_the_export_says_that_check_was_skipped(models, tmp_path):
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "llama_cpp.py").write_text("raise ModuleNotFoundError('hidden for this test')\n")
    r = run("EXPORT.py", "--model", models["gpt2"], "--format", "gguf", "--out", tmp_path / "m.gguf",
            env={"PYTHONPATH": str(tmp_path / "hide")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "llama.cpp check skipped: pip install llama-cpp-python" in r.stderr and "llama.cpp 0." not in r.stderr
    ids = torch.tensor([[5, 6, 7, 8, 9]])  # still written whole, and checked by transformers: it scores as the model
    with torch.no_grad():
        got, want = load(tmp_path / "m.gguf")(ids).logits, load(models["gpt2"])(ids).logits
    assert torch.allclose(got, want, atol=2e-2) and not torch.equal(got, want)  # f16 weights: close, not equal


def test_a_gguf_can_be_exported_again(ggufs, tmp_path):
    r = run("EXPORT.py", "--model", ggufs["gpt2", "f32"][0], "--format", "gguf", "--quant", "q8_0",
            "--out", tmp_path / "again.gguf", "--min-agreement", str(AGREEMENT["q8_0"]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "weights identical to those written" in r.stderr


# --- llama.cpp itself: runs where llama-cpp-python is installed, reported as skipped otherwise -----------------

def llama_cpp_greedy(llm, ids, n, eos):
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < n and (not out or out[-1] != eos):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out[:out.index(eos)] if eos in out else out


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_tokenizes_like_the_model_tokenizer(models, ggufs, arch):
    from TOKENIZER import load_tokenizer
    llm, tok = llama_cpp_model(ggufs[arch, "f32"][0]), load_tokenizer(str(models[arch]))
    texts = open(os.path.join(ROOT, "tests", "data", "train.txt")).read().splitlines()[:50]
    assert [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts] == [tok(t).input_ids for t in texts]


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_f32_greedy_matches_infer_token_for_token(models, ggufs, arch):
    from TOKENIZER import load_tokenizer
    llm, tok = llama_cpp_model(ggufs[arch, "f32"][0]), load_tokenizer(str(models[arch]))
    r = run("INFER.py", "--model", models[arch], "--greedy", "--max-new-tokens", "24", "--each-line", "--jsonl",
            stdin="\n".join(PROMPTS) + "\n")
    assert r.returncode == 0, r.stderr
    for prompt, line in zip(PROMPTS, r.stdout.splitlines(), strict=True):
        record = json.loads(line)
        ids = llama_cpp_greedy(llm, tok(prompt).input_ids, 24, tok.eos_token_id)
        assert (tok.decode(ids, skip_special_tokens=True), len(ids)) == \
            (record["completion"], record["completion_tokens"]), prompt


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_quantised_top1_agrees_with_pytorch(models, ggufs, arch, quant):
    from TOKENIZER import load_tokenizer
    llm, tok, model = llama_cpp_model(ggufs[arch, quant][0]), load_tokenizer(str(models[arch])), load(models[arch])
    agree = total = 0
    for line in open(os.path.join(ROOT, "tests", "data", "train.txt")).read().splitlines()[100:140]:
        ids = tok(line).input_ids[:128]
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
        agree += int((np.argmax(llm.scores[:len(ids)], -1) == ref).sum())
        total += len(ids)
    assert total > 500 and agree / total >= AGREEMENT[quant], f"{agree}/{total}"


# --- refusals (more in test_bad_input.py) -------------------------------------------------------------------------------------------------

def test_gguf_refuses_a_variant_llama_cpp_does_not_compute(models, tmp_path):
    relu = tmp_path / "relu"
    shutil.copytree(models["gpt2"], relu)
    config = json.load(open(relu / "config.json"))
    json.dump({**config, "activation_function": "relu"}, open(relu / "config.json", "w"))
    r = run("EXPORT.py", "--model", relu, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 2 and "activation relu" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["relu"]  # no file, no scratch folder left behind


def test_an_existing_export_is_replaced_only_with_overwrite(models, ggufs, tmp_path):
    target = tmp_path / "m.gguf"
    shutil.copy(ggufs["gpt2", "f16"][0], target)
    before = target.read_bytes()
    r = run("EXPORT.py", "--model", models["gpt2"], "--format", "gguf", "--quant", "q8_0", "--out", target)
    assert r.returncode == 2 and "already exists - pass --overwrite" in r.stderr and target.read_bytes() == before
    r = run("EXPORT.py", "--model", models["gpt2"], "--format", "gguf", "--quant", "q8_0", "--out", target,
            "--overwrite", "--min-agreement", str(AGREEMENT["q8_0"]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert target.read_bytes() == open(ggufs["gpt2", "q8_0"][0], "rb").read()  # and the export is deterministic
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
