"""Generate text from an ONNX export (EXPORT.py --format onnx) with onnxruntime alone: no torch, no transformers.

    python ONNX_RUN.py --model model-onnx --prompt "It is a truth"            # greedy, as INFER.py --greedy
    echo "It is a truth" | python ONNX_RUN.py --model model-onnx --temperature 0.8 --seed 1
    python model-onnx/generate.py --chat --prompt "What is the capital of France?"   # the copy in every export

Needs `pip install onnxruntime tokenizers numpy` (and jinja2 for --chat). An export folder holds model.onnx, one
graph for the prompt and for each new token: input_ids, attention_mask, position_ids and every layer's past keys
and values in; logits and the present keys and values out. Beside it: tokenizer.json, chat_template.jinja (if the
model has one) and generation.json (end tokens, context length, INFER.py's defaults). This file uses nothing else
of LLM-MINI, so it can be copied anywhere; EXPORT.py puts a copy in every export as generate.py. Only the
generated text goes to stdout. Sampling draws from numpy's generator, so a --seed gives other text than INFER.py's.
"""
import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def fail(message):
    """A mistake in the arguments: one line on stderr and exit code 2, as LLM-MINI's scripts do."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load(folder, threads=0):
    """(onnxruntime session, tokenizer, generation.json's settings) of an export folder; threads 0 = all cores."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"])
    with open(os.path.join(folder, "generation.json"), encoding="utf-8") as f:
        settings = json.load(f)
    return session, Tokenizer.from_file(os.path.join(folder, "tokenizer.json")), settings


def empty_cache(session, batch):
    """Every past_key_values.N.key/value input holding no positions yet: (batch, kv heads, 0, head size)."""
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), DTYPES[i.type])
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}


def forward(session, ids, mask, past):
    """ids (batch, new) int64 after the positions in `past`; mask (batch, past + new), 0 at left padding.
    -> (logits (batch, new, vocab), the cache with the new positions added)."""
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)[:, mask.shape[1] - ids.shape[1]:]
    logits, *present = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
    names = [o.name.replace("present.", "past_key_values.", 1) for o in session.get_outputs()[1:]]
    return logits, dict(zip(names, present))


def generate(session, prompt_ids, max_new_tokens, eos, pick):
    """Yield up to max_new_tokens token ids after prompt_ids, ending after one in `eos`; pick(the last position's
    logits, (vocab,)) -> the next id. The prompt goes in one step, then one token a step, reusing the cache."""
    ids = np.array([prompt_ids], dtype=np.int64)
    mask, past = np.ones_like(ids), empty_cache(session, 1)
    for _ in range(max_new_tokens):
        logits, past = forward(session, ids, mask, past)
        token = pick(logits[0, -1])
        yield token
        if token in eos:
            return
        ids, mask = np.array([[token]], dtype=np.int64), np.ones((1, mask.shape[1] + 1), dtype=np.int64)


def greedy(logits):
    return int(np.argmax(logits))


def sampler(temperature, top_k, top_p, seed):
    """pick() drawing from softmax(logits / temperature), cut to the top_k ids (0: all) and the top_p mass."""
    rng = np.random.default_rng(seed)

    def pick(logits):
        z = logits.astype(np.float64) / temperature
        if 0 < top_k < len(z):
            z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1:  # keep the most likely ids until their mass reaches top_p (at least one)
            order = np.argsort(-p)
            p[order[(np.cumsum(p[order]) - p[order]) >= top_p]] = 0
            p /= p.sum()
        return int(rng.choice(len(p), p=p))
    return pick


def chat_prompt(folder, settings, text, system):
    """The prompt rendered with the model's chat template, ready for the assistant's answer (as INFER.py --chat)."""
    path = os.path.join(folder, "chat_template.jinja")
    if not os.path.exists(path):
        raise LookupError(f"--chat: {path} does not exist (the model has no chat template, or one this runner "
                          f"cannot render as transformers does) - drop --chat")
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # only for --chat
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    with open(path, encoding="utf-8") as f:
        template = env.from_string(f.read())
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return template.render(messages=messages, add_generation_prompt=True, **settings["special_tokens"])


def prompt_ids(folder, tokenizer, settings, text, chat, system=None):
    """Prompt text -> token ids, as INFER.py encodes it (the chat template already holds BOS and the like)."""
    if chat:
        return tokenizer.encode(chat_prompt(folder, settings, text, system), add_special_tokens=False).ids
    return tokenizer.encode(text).ids


def stream(tokenizer, tokens, eos, out):
    """Write the text of `tokens` as it comes (never half a character), up to an end token."""
    ids, shown = [], 0
    for token in tokens:
        if token in eos:
            break
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        out.write(text[shown:])
        out.flush()
        shown = len(text)
    out.write(tokenizer.decode(ids, skip_special_tokens=True)[shown:])  # at the end, even half a character


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=here, help="the export folder (default: the folder this file is in)")
    p.add_argument("--prompt", help="text to continue; default: all of stdin")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate at most (default: INFER.py's)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default: INFER.py's)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens, 0 = all")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template; stop at its end of turn")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: one per core)")
    a = p.parse_args(argv)
    for flag, value, ok in [("--max-new-tokens", a.max_new_tokens, lambda v: v >= 1),
                            ("--temperature", a.temperature, lambda v: v >= 0), ("--top-k", a.top_k, lambda v: v >= 0),
                            ("--top-p", a.top_p, lambda v: 0 < v <= 1)]:
        if value is not None and not ok(value):
            fail(f"{flag} {value}: out of range - see --help")
    if not os.path.exists(os.path.join(a.model, "model.onnx")):
        fail(f"--model {a.model}: holds no model.onnx - pass a folder written by EXPORT.py --format onnx")
    session, tokenizer, settings = load(a.model, a.threads)
    d = settings["defaults"]
    temperature = d["temperature"] if a.temperature is None else a.temperature
    pick = greedy if a.greedy or temperature == 0 else sampler(
        temperature, d["top_k"] if a.top_k is None else a.top_k, d["top_p"] if a.top_p is None else a.top_p, a.seed)
    text = a.prompt if a.prompt is not None else sys.stdin.read().removesuffix("\n")  # echo adds one
    if not text.strip():
        fail("empty prompt - pass --prompt TEXT or pipe text on stdin")
    try:
        ids = prompt_ids(a.model, tokenizer, settings, text, a.chat, a.system)
    except LookupError as e:
        fail(str(e))
    context = settings["context"]
    max_new = min(d["max_new_tokens"] if a.max_new_tokens is None else a.max_new_tokens, context - 1)
    if len(ids) > context - max_new:  # keep the prompt's tail, as INFER.py does
        print(f"warning: a prompt of {len(ids)} tokens is too long; keeping its last {context - max_new} so that "
              f"{max_new} new tokens fit the model's context of {context}", file=sys.stderr)
        ids = ids[-(context - max_new):]
    eos = set(settings["eos"] + (settings["chat_eos"] if a.chat else []))
    stream(tokenizer, generate(session, ids, max_new, eos, pick), eos, sys.stdout)
    print(flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
