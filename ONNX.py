"""ONNX export with a KV cache (EXPORT.py --format onnx): a folder that generates in onnxruntime alone.

model.onnx is one graph for the prompt and for every new token (onnxruntime-genai's decoder layout):
    in:  input_ids (batch, new), attention_mask (batch, past + new), position_ids (batch, new), all int64;
         past_key_values.N.key / .value (batch, kv heads, past, head size) for every layer N (past 0: the prompt)
    out: logits (batch, new, vocab); present.N.key / .value (batch, kv heads, past + new, head size)
written by torch.onnx.export (the dynamo exporter) from the transformers model with a DynamicCache, fp32, or with
int8 matmul weights in blocks of 32 (onnxruntime's MatMulNBits). Beside it: the tokenizer, generation.json,
genai_config.json (for onnxruntime-genai) and generate.py (a copy of ONNX_RUN.py). Checked before it is kept:
tokenization equal to the model's tokenizer, logits equal to PyTorch's on padded batches, and 32 greedy tokens
after each of several prompts equal to INFER.py --greedy's (int8: at least --min-agreement of next-token choices),
in onnxruntime and, where it is installed, in onnxruntime-genai.
"""
import json
import logging
import os
import shutil

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import DynamicCache

import ONNX_RUN
from CONFIG import InferCfg
from GENERATE import Options, Row, chat_ids, generate, stops_and_eos
from MODEL import context_length
from REPORT import UserError, log

PROMPTS = ["It is a truth universally acknowledged", "Once upon a time", "The weather", "She said"]
NEW_TOKENS = 32


class WithCache(torch.nn.Module):
    """The model as (input_ids, attention_mask, position_ids, past tensors) -> (logits, *present tensors): the
    cache as flat tensors, [layer 0 key, layer 0 value, layer 1 key, ...], which an ONNX graph can take."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        return out.logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)]


def sample_inputs(model, batch=2, new=3, past=4):
    """Example inputs for the export (a cache of `past` positions, shaped as the model makes it), and their names.
    Past and new sizes above 1, so the exporter keeps them dynamic: 0 and 1 would be fixed into the graph."""
    ids = torch.randint(0, model.config.vocab_size, (batch, past + new))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :past], use_cache=True).cache
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    mask = torch.ones_like(ids)
    positions = torch.arange(past, past + new).expand(batch, new)
    names = [f"{k}.{n}.{kv}" for k in ("past_key_values", "present") for n in range(len(cache.layers))
             for kv in ("key", "value")]
    return (ids[:, past:], mask, positions, tensors), names


def write(model, tokenizer, folder, quant):
    """folder/model.onnx (+ model.onnx.data: the weights), the tokenizer, generation.json, genai_config.json and
    generate.py."""
    inputs, names = sample_inputs(model)
    n_past = len(inputs[3])  # a key and a value per layer
    any_size = torch.export.Dim.DYNAMIC
    shapes = {"input_ids": {0: any_size, 1: any_size}, "attention_mask": {0: any_size, 1: any_size},
              "position_ids": {0: any_size, 1: any_size}, "past": [{0: any_size, 2: any_size}] * n_past}
    path = os.path.join(folder, "model.onnx")
    plain = path if quant == "f32" else os.path.join(folder, "f32", "model.onnx")
    os.makedirs(os.path.dirname(plain), exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(WithCache(model).eval(), inputs, plain, dynamo=True, dynamic_shapes=shapes, verbose=False,
                          input_names=["input_ids", "attention_mask", "position_ids", *names[:n_past]],
                          output_names=["logits", *names[n_past:]], external_data=True)
    if quant == "int8":
        quantize_int8(plain, path)
        shutil.rmtree(os.path.dirname(plain))
    tokenizer.save_pretrained(folder)
    if isinstance(tokenizer.chat_template, str) and not os.path.exists(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(tokenizer.chat_template)
    settings = generation_settings(model, tokenizer)
    with open(os.path.join(folder, "generation.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    template = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(template) and not runner_chats_as_infer(tokenizer, folder, settings):
        log("warning: generate.py cannot prompt this chat template as INFER.py --chat does (it renders differently "
            "outside transformers, or ends a turn with several tokens), so the export leaves it out and its --chat "
            "says so; plain prompts are unaffected")
        os.remove(template)
    with open(os.path.join(folder, "genai_config.json"), "w", encoding="utf-8") as f:
        json.dump(genai_config(model.config, inputs[3][0].shape, settings), f, indent=1)
    shutil.copyfile(ONNX_RUN.__file__, os.path.join(folder, "generate.py"))


def generation_settings(model, tokenizer):
    """generation.json: what INFER.py generates with, for the runner: end tokens (a chat's end of turn apart), the
    context, the template's special tokens, and INFER.py's sampling defaults (CONFIG's)."""
    _, eos = stops_and_eos(tokenizer, [], False)
    _, chat_eos = stops_and_eos(tokenizer, [], True)
    defaults = InferCfg()
    return {"eos": eos, "chat_eos": [e for e in chat_eos if e not in eos], "context": context_length(model.config),
            "special_tokens": {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
            "defaults": {k: getattr(defaults, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p")}}


def genai_config(config, cache_shape, settings):
    """onnxruntime-genai's description of the folder (genai_config.json), so that its og.Model(folder) runs it too.
    Its "llama" decoder reads the graph by the input and output names given here, which serves gpt2 as well."""
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    decoder = {"filename": "model.onnx", "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
               "head_size": cache_shape[3], "hidden_size": text.hidden_size, "num_attention_heads": heads,
               "num_hidden_layers": text.num_hidden_layers, "num_key_value_heads": cache_shape[1],
               "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"}}
    d = settings["defaults"]
    return {"model": {"type": text.model_type if text.model_type in ("llama", "mistral", "qwen2") else "llama",
                      "decoder": decoder, "vocab_size": text.vocab_size, "context_length": settings["context"],
                      "bos_token_id": text.bos_token_id if text.bos_token_id is not None else settings["eos"][0],
                      "eos_token_id": settings["eos"] + settings["chat_eos"], "pad_token_id": settings["eos"][0]},
            "search": {"do_sample": True, "temperature": d["temperature"], "top_k": d["top_k"], "top_p": d["top_p"],
                       "max_length": settings["context"], "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                       "past_present_share_buffer": False, "repetition_penalty": 1.0}}


def genai_greedy(folder, cases):
    """The greedy tokens onnxruntime-genai generates from the folder after each case's prompt ids, or None where it
    is not installed."""
    try:
        import onnxruntime_genai as og  # optional: the check runs where it is installed
    except ImportError:
        return None
    model, out = og.Model(folder), []
    for _, ids, _, _ in cases:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + NEW_TOKENS)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        new = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        out.append(new)
    return out, og.__version__


def quantize_int8(source, path):
    """Every matmul weight as int8 in blocks of 32 with a scale each (GGUF's q8_0 scheme): onnxruntime's MatMulNBits,
    whose accuracy level 4 multiplies in int8. Its dynamic quantisation (quantize_dynamic) rounds activations to
    int8 per tensor, which a language model's outlier features do not survive (SmolLM2-135M: 56% of next-token
    choices kept, against 97% here)."""
    import onnx  # only for int8: onnxruntime's quantiser works on onnx's protobuf model
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    graph = onnx.load(source)
    gemm_as_matmul(graph, onnx.helper)
    settings = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=8, accuracy_level=4)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # not a line per matmul
    quantizer = MatMulNBitsQuantizer(graph, algo_config=settings)
    quantizer.process()
    quantizer.model.save_model_to_file(path, use_external_data_format=True)


def gemm_as_matmul(graph, helper):
    """GPT-2's Conv1D layers export as Gemm (torch.addmm) and MatMulNBits replaces MatMul only: Gemm(x, W, b) with
    W a weight and no transposes or scales becomes MatMul(x, W) + b, the same arithmetic."""
    weights, nodes = {t.name for t in graph.graph.initializer}, []
    for node in graph.graph.node:
        attrs = {"transA": 0, "transB": 0, "alpha": 1, "beta": 1,
                 **{a.name: helper.get_attribute_value(a) for a in node.attribute}}
        plain = (attrs["transA"], attrs["transB"], attrs["alpha"], attrs["beta"]) == (0, 0, 1, 1)
        if node.op_type != "Gemm" or node.input[1] not in weights or len(node.input) < 3 or not plain:
            nodes.append(node)
            continue
        product = node.output[0] + ".matmul"
        nodes += [helper.make_node("MatMul", node.input[:2], [product], name=node.name + ".matmul"),
                  helper.make_node("Add", [product, node.input[2]], list(node.output), name=node.name + ".bias")]
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)


def pytorch_greedy(model, tokenizer, ids, eos):
    """The tokens INFER.py --greedy generates after `ids` (GENERATE.generate, the same call)."""
    opts = Options(NEW_TOKENS, dict(do_sample=False), [], eos)
    return generate(model, tokenizer, [Row(list(ids), opts)])[0].new_ids


def prompts(tokenizer, runner_tokenizer, folder, settings):
    """(label, the runner's token ids, the model tokenizer's ids, end tokens) for each check prompt, and a chat
    question where the export carries a chat template."""
    out = [(repr(p), ONNX_RUN.prompt_ids(folder, runner_tokenizer, settings, p, False), tokenizer(p)["input_ids"],
            settings["eos"]) for p in PROMPTS]
    if os.path.exists(os.path.join(folder, "chat_template.jinja")):
        question = "What is the capital of France?"
        out.append((f"the chat question {question!r}", runner_chat(folder, runner_tokenizer, settings, question),
                    chat_ids(tokenizer, [{"role": "user", "content": question}]),
                    settings["eos"] + settings["chat_eos"]))
    return out


def runner_chat(folder, runner_tokenizer, settings, question, system=None):
    """The runner's token ids for a chat question, or None where it cannot render the template."""
    try:
        return ONNX_RUN.prompt_ids(folder, runner_tokenizer, settings, question, True, system)
    except Exception:  # noqa: BLE001 - a template that needs transformers' own additions to jinja2
        return None


def runner_chats_as_infer(tokenizer, folder, settings):
    """Whether the runner's --chat prompts as INFER.py --chat does: the same ids with and without a system message,
    and a chat's end of turn that is one token (the runner has no stop strings)."""
    runner_tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    system, question = "Be brief.", "Hello"
    with_system = chat_ids(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": question}])
    stops, _ = stops_and_eos(tokenizer, [], True)
    return not stops and runner_chat(folder, runner_tokenizer, settings, question) == chat_ids(
        tokenizer, [{"role": "user", "content": question}]) and \
        runner_chat(folder, runner_tokenizer, settings, question, system) == with_system


def verify(model, tokenizer, folder, quant, min_agreement):
    """Check the folder in onnxruntime, as ONNX_RUN.py uses it: -> what was verified, or UserError."""
    session, runner_tokenizer, settings = ONNX_RUN.load(folder)
    cases = prompts(tokenizer, runner_tokenizer, folder, settings)
    for label, ours, theirs, _ in cases:
        if ours != theirs:
            raise UserError(f"tokenizer.json alone encodes {label} as {ours[:12]}..., the model's tokenizer as "
                            f"{theirs[:12]}... - this tokenizer cannot be used without transformers")
    checks = ["the tokenizer alone encodes as transformers does"]
    if quant == "f32":
        diff, scale = logits_difference(model, session)
        if not diff <= 1e-5 * scale:
            raise UserError(f"onnxruntime's logits differ from PyTorch's by {diff:.2e} (allowed 1e-5 x {scale:.1f})")
        checks.append(f"onnxruntime's logits on padded batches within {diff:.1e} of PyTorch's (largest {scale:.1f})")
    wants = [pytorch_greedy(model, tokenizer, ids, eos) for _, ids, _, eos in cases]
    checks.append(check_generation(model, session, cases, wants, quant, min_agreement))
    return checks + [check_genai(folder, cases, wants, quant, set(settings["eos"] + settings["chat_eos"]))]


def check_generation(model, session, cases, wants, quant, min_agreement):
    """onnxruntime's greedy tokens after each case's prompt against PyTorch's (`wants`): f32 equal, int8 agreeing
    on at least min_agreement of next-token choices, teacher-forced."""
    same = agree = total = 0
    for (label, ids, _, eos), want in zip(cases, wants):
        got = list(ONNX_RUN.generate(session, ids, NEW_TOKENS, set(eos), ONNX_RUN.greedy))
        if quant == "f32" and got != want:
            k = next(i for i, (a, b) in enumerate(zip(got + [None], want + [None])) if a != b)
            raise UserError(f"greedy generation after {label} differs from INFER.py --greedy's at token {k + 1}: "
                            f"onnxruntime {got[k:k + 4]}..., PyTorch {want[k:k + 4]}...")
        same += got == want
        a, n = next_token_agreement(model, session, ids, want)
        agree, total = agree + a, total + n
    if quant == "f32":
        return (f"greedy generation ({NEW_TOKENS} tokens) identical to INFER.py --greedy's after {same}/{len(cases)} "
                "prompts")
    if not agree / total >= min_agreement:
        raise UserError(f"next-token agreement with PyTorch {agree}/{total} = {agree / total:.2%} is below "
                        f"--min-agreement {min_agreement} - lower it to accept, or export f32")
    return (f"next-token top-1 agreement with PyTorch {agree}/{total} = {agree / total:.2%}; greedy generation "
            f"identical after {same}/{len(cases)} prompts")


def check_genai(folder, cases, wants, quant, ends):
    """Where onnxruntime-genai is installed: its greedy tokens from the folder, against PyTorch's (f32: equal);
    `ends`: the end tokens genai_config.json gives it."""
    genai = genai_greedy(folder, cases)
    if genai is None:
        return "onnxruntime-genai check skipped: pip install onnxruntime-genai"
    outs, version = genai

    def upto_end(tokens):  # genai stops at its config's end tokens, which a chat's end of turn is one of
        return next((tokens[:i + 1] for i, t in enumerate(tokens) if t in ends), tokens)
    same = sum(upto_end(o) == upto_end(w) for o, w in zip(outs, wants))
    if quant == "f32" and same < len(cases):
        raise UserError(f"onnxruntime-genai {version}'s greedy generation differs from INFER.py --greedy's after "
                        f"{len(cases) - same}/{len(cases)} prompts")
    return f"onnxruntime-genai {version}: greedy generation identical after {same}/{len(cases)} prompts"


def logits_difference(model, session):
    """Largest |logit difference| against PyTorch over real positions of left-padded batches, in the prompt step
    and in a step after a cache; and the largest |logit|."""
    g = torch.Generator().manual_seed(0)
    diff = scale = 0.0
    for batch, seq in [(1, 5), (2, 9), (3, 17)]:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, :seq // 3] = 0 if batch > 1 else 1
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        split = seq - 2  # the prompt step, then two tokens with the cache
        first, past = ONNX_RUN.forward(session, ids[:, :split].numpy(), mask[:, :split].numpy(),
                                       ONNX_RUN.empty_cache(session, batch))
        second, _ = ONNX_RUN.forward(session, ids[:, split:].numpy(), mask.numpy(), past)
        got = torch.from_numpy(np.concatenate([first, second], axis=1))
        diff = max(diff, float(((got - want).abs().amax(-1) * mask).max()))
        scale = max(scale, float(want.abs().max()))
    return diff, scale


def next_token_agreement(model, session, prompt, continuation):
    """(positions where onnxruntime's top-1 is PyTorch's, positions), teacher-forced over prompt + continuation."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].argmax(-1)
    got, _ = ONNX_RUN.forward(session, ids.numpy(), np.ones_like(ids.numpy()), ONNX_RUN.empty_cache(session, 1))
    return int((torch.from_numpy(got[0]).argmax(-1) == want).sum()), len(want)
