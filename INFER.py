"""Generate text with a trained model. Only the continuation goes to stdout; everything else to stderr.

    python INFER.py --model out --prompt "Once upon a time"
    echo "Once upon a time" | python INFER.py --model out
    python INFER.py --model out/ckpt-step-200 --greedy --max-new-tokens 40 --prompt "The"
"""
import sys

import CONFIG
from CONFIG import UserError


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_prompt(prompt, stdin):
    if prompt is None:
        if stdin.isatty():
            log("reading the prompt from stdin (end with Ctrl-D)")
        prompt = stdin.read()
        if prompt.endswith("\n"):  # `echo` adds one; training samples are lines without it
            prompt = prompt[:-1]
    if not prompt.strip():
        raise UserError("empty prompt - pass --prompt TEXT or pipe text on stdin")
    return prompt


def fit_context(ids, max_new_tokens, context):
    """Keep the tail of a prompt that leaves no room for max_new_tokens in the context window."""
    max_new_tokens = min(max_new_tokens, context - 1)
    room = context - max_new_tokens
    if ids.shape[1] > room:
        log(f"warning: the prompt is {ids.shape[1]} tokens; keeping its last {room} so that {max_new_tokens} new "
            f"tokens fit the model's context of {context}")
        ids = ids[:, -room:]
    return ids, max_new_tokens


def main(argv):
    cfg, flags, _ = CONFIG.load(argv, CONFIG.INFER_SECTIONS, description=__doc__, config_default=None)
    if "model.name" not in flags:
        raise UserError("--model is required: a directory written by TRAIN.py (e.g. --model out) or a hub id")
    g = cfg.infer
    prompt = read_prompt(g.prompt, sys.stdin)

    import torch
    from transformers import TextStreamer
    from MODEL import context_length, load_pretrained, pick_device, DTYPES
    from TOKENIZER import load_tokenizer
    device = pick_device(cfg.model.device)
    dtype = {"auto": torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32,
             **DTYPES}[cfg.model.dtype]
    model = load_pretrained(cfg.model.name, dtype, attn_implementation=cfg.model.attn_implementation,
                            trust_remote_code=cfg.model.trust_remote_code).to(device).eval()
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids, max_new = fit_context(ids, g.max_new_tokens, context_length(model.config))
    if g.seed is not None:
        torch.manual_seed(g.seed)
    sampling = dict(do_sample=False) if g.greedy or g.temperature == 0 else dict(do_sample=True, temperature=g.temperature,
                                                           top_k=g.top_k, top_p=g.top_p)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints to stdout as it goes
    with torch.inference_mode():
        model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=max_new,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       streamer=streamer, **sampling)


if __name__ == "__main__":
    CONFIG.main_guard(main)
