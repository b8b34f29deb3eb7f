"""EXPORT.py --format onnx: a folder with a KV cache that generates in onnxruntime alone, as INFER.py does."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from conftest import LLAMA, ROOT, TRAINED, load, run, train

ARCHS = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def onnx_exports(models, chat_model, tmp_path_factory):
    """{name: (folder, EXPORT.py's stderr)} for gpt2 and llama in f32 and int8, and a chat llama in f32."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root, out = tmp_path_factory.mktemp("onnx"), {}
    for name, model, quant in [("gpt2", models["gpt2"], "f32"), ("llama", models["llama"], "f32"),
                               ("gpt2-int8", models["gpt2"], "int8"), ("chat", chat_model, "f32")]:
        r = run("EXPORT.py", "--model", model, "--format", "onnx", "--quant", quant, "--out", root / name,
                *(["--min-agreement", "0.9"] if quant == "int8" else []))
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = root / name, r.stderr
    return out


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "llama"
    train(out, *TRAINED, *LLAMA, "--data", "data/chat.jsonl", "--max-length", "128")
    return out


def without_torch(script, *args, stdin=None):
    """Run a Python file in a process where importing torch or transformers fails, as on a machine without them."""
    code = ("import runpy, sys\n"
            "sys.modules.update(torch=None, transformers=None)  # None in sys.modules: any import of it fails\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    # run from elsewhere, so that none of this repository's modules can be imported either
    return subprocess.run([sys.executable, "-c", code, str(script), *map(str, args)], cwd=tempfile.gettempdir(),
                          input=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_export_is_a_folder_of_the_graph_its_tokenizer_and_runner(onnx_exports, arch):
    folder, stderr = onnx_exports[arch]
    assert f"wrote {folder} (" in stderr and "onnx f32 with a KV cache" in stderr
    assert sorted(os.listdir(folder)) == ["genai_config.json", "generate.py", "generation.json", "model.onnx",
                                          "model.onnx.data", "tokenizer.json", "tokenizer_config.json"]


def test_onnx_verification_refuses_a_graph_that_is_not_the_models(models, onnx_exports):
    """The check EXPORT.py runs before it keeps a folder: the gpt2 export against the same model with one weight
    changed (its greedy text the same or not) is an error, and against the model itself it passes."""
    import ONNX
    from REPORT import UserError
    from TOKENIZER import load_tokenizer
    folder, tok = onnx_exports["gpt2"][0], load_tokenizer(str(models["gpt2"]))
    model = load(models["gpt2"])
    assert ONNX.verify(model, tok, str(folder), "f32", 0.99)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 0.01
    with pytest.raises(UserError, match="differ"):
        ONNX.verify(model, tok, str(folder), "f32", 0.99)


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_runner_without_torch_generates_what_infer_greedy_does(models, onnx_exports, arch):
    folder, texts = onnx_exports[arch][0], []
    for prompt in ["It is a truth", "The weather", "She said"]:
        want = run("INFER.py", "--model", models[arch], "--prompt", prompt, "--greedy", "--max-new-tokens", "32")
        got = without_torch(folder / "generate.py", "--prompt", prompt, "--greedy", "--max-new-tokens", "32")
        assert got.returncode == 0, got.stderr[-2000:]
        assert got.stdout == want.stdout, prompt
        texts.append(want.stdout)
    assert len(set("".join(texts))) > 8  # varied text (some ending at EOS), not "eeee..."


@pytest.mark.parametrize("name", ["gpt2", "llama", "chat"])
def test_onnxruntime_genai_runs_the_folder_as_infer_greedy_does(models, chat_model, onnx_exports, name):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    folder, stderr = onnx_exports[name]
    assert f"onnxruntime-genai {og.__version__}: greedy generation identical after" in stderr
    source = chat_model if name == "chat" else models[name]
    model, prompt = og.Model(str(folder)), "It is a truth"
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=64)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode(prompt))
    while not generator.is_done():
        generator.generate_next_token()
    text = tokenizer.decode(generator.get_sequence(0))  # the prompt and the answer, without end tokens
    want = run("INFER.py", "--model", source, "--prompt", prompt, "--greedy", "--max-new-tokens", "64")
    answer = text.removeprefix(prompt)
    assert answer.strip() and answer == want.stdout.removesuffix("\n")[:len(answer)]


def test_without_onnxruntime_genai_the_export_says_that_check_was_skipped(models, tmp_path):
    pytest.importorskip("onnxruntime")
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "onnxruntime_genai.py").write_text("raise ModuleNotFoundError('hidden for this test')\n")
    r = run("EXPORT.py", "--model", models["llama"], "--out", tmp_path / "m",
            env={"PYTHONPATH": str(tmp_path / "hide")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "onnxruntime-genai check skipped: pip install onnxruntime-genai" in r.stderr
    # the folder is still whole: genai's config written, and the runner generates what INFER.py --greedy does
    assert json.load(open(tmp_path / "m" / "genai_config.json"))["model"]["decoder"]["filename"] == "model.onnx"
    want = run("INFER.py", "--model", models["llama"], "--prompt", "The weather", "--greedy", "--max-new-tokens", "16")
    got = without_torch(tmp_path / "m" / "generate.py", "--prompt", "The weather", "--greedy", "--max-new-tokens", "16")
    assert got.returncode == 0 and got.stdout == want.stdout, got.stderr[-2000:]


def test_onnx_runner_reads_stdin_and_samples_reproducibly(onnx_exports):
    runner = os.path.join(ROOT, "ONNX_RUN.py")
    folder = onnx_exports["gpt2"][0]
    piped = without_torch(runner, "--model", folder, "--greedy", "--max-new-tokens", "12", stdin="It is a truth\n")
    given = without_torch(runner, "--model", folder, "--greedy", "--max-new-tokens", "12", "--prompt", "It is a truth")
    assert piped.returncode == 0 and piped.stdout == given.stdout
    sampled = [without_torch(runner, "--model", folder, "--prompt", "It is", "--seed", str(s), "--temperature", "1.5",
                             "--max-new-tokens", "24").stdout for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_onnx_runner_chats_like_infer(onnx_exports, chat_model):
    folder = onnx_exports["chat"][0]
    assert "identical to INFER.py --greedy's after 5/5 prompts" in onnx_exports["chat"][1]  # 4 texts + a chat
    question = "What did the assistant say?"
    want = run("INFER.py", "--model", chat_model, "--chat", "--prompt", question, "--greedy", "--max-new-tokens", "40")
    got = without_torch(folder / "generate.py", "--chat", "--prompt", question, "--greedy", "--max-new-tokens", "40")
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout == want.stdout and want.stdout.strip()


def test_onnx_int8_is_smaller_and_checked_by_agreement(onnx_exports):
    folder, stderr = onnx_exports["gpt2-int8"]
    assert "onnx int8 with a KV cache" in stderr and "next-token top-1 agreement with PyTorch" in stderr
    weights = {name: (onnx_exports[name][0] / "model.onnx.data").stat().st_size for name in ("gpt2", "gpt2-int8")}
    assert weights["gpt2-int8"] < 0.6 * weights["gpt2"]  # every matmul, GPT-2's Conv1D layers included
    r = without_torch(folder / "generate.py", "--prompt", "It is a truth", "--greedy")
    assert r.returncode == 0 and r.stdout.strip()


def test_onnx_int8_below_min_agreement_fails_and_leaves_nothing(models, tmp_path):
    pytest.importorskip("onnxruntime")
    # one input row of every layer's weights 1000x larger: a block of 32 then shares that row's int8 scale, its
    # other 31 weights round to 0, and the int8 model's next-token choices move away from the f32 model's
    outliers = tmp_path / "outliers"
    model = load(models["gpt2"])
    with torch.no_grad():
        for layer in model.transformer.h:
            for linear in (layer.attn.c_attn, layer.attn.c_proj, layer.mlp.c_fc, layer.mlp.c_proj):
                linear.weight[0] *= 1000
    model.save_pretrained(outliers)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models["gpt2"] / f, outliers / f)
    r = run("EXPORT.py", "--model", outliers, "--quant", "int8", "--min-agreement", "1", "--out", tmp_path / "m")
    assert r.returncode == 2 and "is below --min-agreement 1.0" in r.stderr and "nothing was written" in r.stderr
    assert "Traceback" not in r.stderr and sorted(os.listdir(tmp_path)) == ["outliers"]


def test_an_onnx_folder_is_replaced_whole_only_with_overwrite(models, onnx_exports, tmp_path):
    target = tmp_path / "m-onnx"
    shutil.copytree(onnx_exports["llama"][0], target)
    r = run("EXPORT.py", "--model", models["gpt2"], "--out", target)
    assert r.returncode == 2 and "already exists - pass --overwrite" in r.stderr
    (target / "notes.txt").write_text("mine")  # a file the export does not write: never deleted with the folder
    r = run("EXPORT.py", "--model", models["gpt2"], "--out", target, "--overwrite")
    assert r.returncode == 2 and "holds files an export does not write (notes.txt)" in r.stderr
    assert (target / "notes.txt").read_text() == "mine"
    (target / "notes.txt").unlink()
    r = run("EXPORT.py", "--model", models["gpt2"], "--out", target, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["m-onnx"]
    assert (target / "model.onnx").read_bytes() != (onnx_exports["llama"][0] / "model.onnx").read_bytes()


def test_sampling_keeps_the_top_k_ids_and_the_top_p_mass():
    import ONNX_RUN
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    draws = lambda pick: {pick(logits) for _ in range(300)}  # noqa: E731
    assert draws(ONNX_RUN.sampler(1.0, 2, 1.0, seed=0)) == {0, 1}
    assert draws(ONNX_RUN.sampler(1.0, 0, 0.5, seed=0)) == {0, 1}   # 0.4 + 0.3 is the least mass >= 0.5
    assert draws(ONNX_RUN.sampler(1.0, 0, 0.75, seed=0)) == {0, 1, 2}
    assert draws(ONNX_RUN.sampler(1.0, 0, 1.0, seed=0)) == {0, 1, 2, 3}
    assert ONNX_RUN.greedy(logits) == 0


def test_onnx_runner_refuses_a_folder_that_is_not_an_export(tmp_path):
    r = without_torch(os.path.join(ROOT, "ONNX_RUN.py"), "--model", tmp_path, "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--model {tmp_path}: holds no model.onnx - pass a folder written by EXPORT.py --format onnx" in r.stderr


def test_an_onnx_folder_given_to_infer_says_how_to_run_it(onnx_exports):
    folder = onnx_exports["gpt2"][0]
    r = run("INFER.py", "--model", folder, "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{folder}: is an ONNX export, which runs in onnxruntime - python {folder}/generate.py" in r.stderr
