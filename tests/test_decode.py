"""The compiled decoding step (DECODE.py, --decode compiled): in fp32 it gives transformers.generate's greedy tokens
(tiny gpt2 and llama, prompts of several lengths, stop strings, end tokens), it is what actually runs, batches
keep the eager step, and INFER.py and the server use it."""
import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer

import DECODE
import DEVICE
import GENERATE
import QUANT
from conftest import run, serving

PROMPTS = ["A", "Once upon a time", "The little robot lived in a house by the sea, and every morning it"]
GREEDY = GENERATE.sampling_of(True, 0, 0, 1)


def loaded(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def reference(model, tok, prompt, n):
    """transformers' own greedy tokens, eager, with its default (dynamic) cache."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_greedy_is_transformers_generate(models, arch):
    """One row at a time, fp32: every prompt's tokens are transformers.generate's, and the compiled step ran."""
    model, tok = loaded(models[arch])
    references = [reference(model, tok, prompt, 40) for prompt in PROMPTS]  # before compiled_step readies the model
    compiled = DECODE.compiled_step(model)
    graphs = counters["stats"]["unique_graphs"]
    for prompt, expected in zip(PROMPTS, references):
        opts = GENERATE.Options(40, GREEDY, [], [tok.eos_token_id])
        answer = GENERATE.generate(model, tok, [GENERATE.Row(tok(prompt)["input_ids"], opts)], compiled)[0]
        assert answer.new_ids == expected, prompt
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo compiled the step (it did not fall back silently)


def test_an_answer_past_256_tokens_decodes_compiled_in_a_longer_cache(models):
    """A prompt past 256 tokens gets a 512-token cache; the tokens are still transformers.generate's, after a short
    answer (256) compiled the same step. (The tiny llama's RoPE reaches past the 128 positions it trained on.)"""
    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32,
                                                 max_position_embeddings=1024).eval()
    tok = AutoTokenizer.from_pretrained(models["llama"])
    long_prompt = " ".join([PROMPTS[2]] * 7)
    assert 256 < len(tok(long_prompt)["input_ids"]) < 300
    references = [reference(model, tok, prompt, 40) for prompt in (PROMPTS[1], long_prompt)]
    compiled = DECODE.compiled_step(model)
    answers = [GENERATE.generate(model, tok, [GENERATE.Row(tok(prompt)["input_ids"], GENERATE.Options(
        40, GREEDY, [], [tok.eos_token_id]))], compiled)[0].new_ids for prompt in (PROMPTS[1], long_prompt)]
    assert answers == references and all(answers)


def test_stop_strings_and_end_tokens_end_a_compiled_answer_as_an_eager_one(models):
    """A stop string and an end token taken from the eager text end the compiled answer at the same place; rows
    generated together (eager: batches do not compile) equal the compiled rows generated alone."""
    model, tok = loaded(models["llama"])
    compiled = DECODE.compiled_step(model)
    free = GENERATE.generate(model, tok, [GENERATE.Row(tok("Once")["input_ids"], GENERATE.Options(
        30, GREEDY, [], [tok.eos_token_id]))])[0]
    stop, end = tok.decode(free.new_ids[10:12]), free.new_ids[6]
    asks = [("Once", [stop], [tok.eos_token_id]), ("Once", [], [tok.eos_token_id, end]), *((p, [], [tok.eos_token_id])
                                                                                          for p in PROMPTS)]
    rows = lambda: [GENERATE.Row(tok(p)["input_ids"], GENERATE.Options(30, GREEDY, stops, eos))  # noqa: E731
                    for p, stops, eos in asks]
    eager = [GENERATE.generate(model, tok, [row])[0] for row in rows()]
    alone = [GENERATE.generate(model, tok, [row], compiled)[0] for row in rows()]
    assert [(a.text, a.n_tokens, a.ended) for a in alone] == [(a.text, a.n_tokens, a.ended) for a in eager]
    assert alone[0].ended and stop not in alone[0].text and alone[1].ended and alone[1].n_tokens <= 6
    together = GENERATE.generate(model, tok, rows()[2:], compiled)
    assert [a.text for a in together] == [a.text for a in alone[2:]]


@pytest.mark.skipif(not DEVICE.cpu_has_native_bf16(), reason="int8 needs a CPU with native bf16 (AVX512-BF16/AMX)")
def test_two_models_in_one_process_each_get_their_own_step(models):
    """A second model of the same class (the same llama in bf16, then in int8) is not run through the first
    one's graph: each compiled answer is that model's eager one."""
    model, tok = loaded(models["llama"])
    for variant in (model.to(torch.bfloat16), QUANT.to_int8(loaded(models["llama"])[0].to(torch.bfloat16), torch.bfloat16)):
        compiled = DECODE.compiled_step(variant)
        rows = lambda: [GENERATE.Row(tok("The fox")["input_ids"], GENERATE.Options(  # noqa: E731
            20, GREEDY, [], [tok.eos_token_id]))]
        assert GENERATE.generate(variant, tok, rows(), compiled)[0].new_ids == GENERATE.generate(
            variant, tok, rows())[0].new_ids


def test_outside_the_compiled_step_the_model_computes_as_before(models):
    """compiled_step gives the model DECODE.attention, which is sdpa's own wherever the step is not compiling:
    a prompt's eager logits are bit for bit those of before."""
    model, tok = loaded(models["llama"])
    ids = torch.tensor([tok(PROMPTS[2])["input_ids"]])
    with torch.inference_mode():
        before = model(ids).logits
        DECODE.compiled_step(model)
        assert model.config._attn_implementation == DECODE.ATTENTION and torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("tokens, context, length", [(5, 2048, 256), (256, 2048, 256), (257, 2048, 512),
                                                     (1500, 2048, 2048), (100, 128, 128)])
def test_the_static_cache_is_the_next_power_of_two_from_256_within_the_context(models, tokens, context, length):
    model, _ = loaded(models["llama"])
    assert DECODE.static_cache(model, tokens, context).get_max_length() == length


def test_infer_and_the_server_decode_compiled(models, tmp_path):
    """INFER.py --decode compiled prints the eager text; the server compiles as it starts (its default) and
    answers a greedy request with that text too; requests sent at once generate together (on the packed twin,
    GENERATE.for_batches) and get the answers they get alone."""
    args = ["--model", models["llama"], "--greedy", "--prompt", "Once upon a time", "--max-new-tokens", "24"]
    eager, fast = run("INFER.py", *args), run("INFER.py", *args, "--decode", "compiled")
    assert eager.returncode == 0 and fast.returncode == 0, fast.stderr
    assert fast.stdout == eager.stdout and eager.stdout.strip()
    log = tmp_path / "serve.log"
    asks = [{"prompt": p, "max_tokens": 24, "temperature": 0} for p in PROMPTS]
    with serving(models["llama"], "--decode", "auto", log=log) as url:
        post = lambda ask: json.load(urllib.request.urlopen(urllib.request.Request(  # noqa: E731
            url + "/v1/completions", json.dumps(ask).encode(), {"Content-Type": "application/json"}
        )))["choices"][0]["text"]
        assert post(asks[1]) == eager.stdout[:-1]  # PROMPTS[1] is "Once upon a time"
        alone = [post(ask) for ask in asks]
        with ThreadPoolExecutor(len(asks)) as pool:
            together = [list(pool.map(post, asks)) for _ in range(3)]
    assert all(answers == alone for answers in together) and len(set(alone)) > 1
    assert "compiled in" in log.read_text()
    assert re.search(r"at most [23] together", log.read_text())
