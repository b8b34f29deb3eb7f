"""Generate text with a trained model. Only generated text goes to stdout; everything else to stderr.

    python INFER.py --model out --prompt "Once upon a time"
    echo "Once upon a time" | python INFER.py --model out         # all of stdin is one prompt
    python INFER.py --model out --each-line --jsonl < prompts.txt   # one answer per line, batched
    python INFER.py --model out                                     # at a terminal: a "> " loop until Ctrl-D
    python INFER.py --model chat-model --chat --system "Be brief." --prompt "Hi" --stop "User:"
    python INFER.py --model out --serve --port 8000                 # an OpenAI-compatible API (SERVE.py)

--chat renders the prompt with the tokenizer's chat template, exactly as TRAIN.py rendered conversations,
and stops at the template's end of turn (e.g. <|im_end|>) as well as at EOS.
"""
import json
import sys

import CONFIG
from CONFIG import UserError, log


def read_prompt(stdin):
    text = stdin.read()
    if text.endswith("\n"):  # `echo` adds one; training samples are lines without it
        text = text[:-1]
    return text


def cut_at_stop(text, stops, prefix=""):
    """(text up to the first stop string, whether one was found). transformers' StopStringCriteria also
    matches a stop string that begins in the prompt, so `prefix` (the prompt's end) is searched too."""
    joined = prefix + text
    hits = [joined.find(s) for s in stops if s in joined]
    return (text[:max(0, min(hits) - len(prefix))], True) if hits else (text, False)


def held_back(text, stops):
    """How many trailing characters could be the start of a stop string, so must not be printed yet."""
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


def make_streamer(tokenizer, stops, out, end="\n"):
    """transformers' TextStreamer, printing to `out` and never printing a stop string (or its beginning);
    `end` after each answer."""
    from transformers import TextStreamer

    class StopStreamer(TextStreamer):
        text, printed, stopped, final, prefix = "", 0, False, "", ""

        def on_finalized_text(self, new, stream_end=False):
            self.text += new
            shown, self.stopped = cut_at_stop(self.text, stops, self.prefix)
            if not (self.stopped or stream_end):
                shown = shown[:len(shown) - held_back(shown, stops)]
            if len(shown) > self.printed:
                out.write(shown[self.printed:])
                self.printed = len(shown)
            if stream_end:  # ready for the next prompt; `final` is what was shown of this one
                out.write(end)
                self.text, self.printed, self.final = "", 0, shown
            out.flush()
    return StopStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat_ids(tokenizer, messages):
    """A conversation -> the token ids of its chat-template rendering, ready for the assistant's answer."""
    if not tokenizer.chat_template:
        raise UserError("--chat: this model's tokenizer has no chat template - drop --chat, or use a chat model")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds BOS etc.


def encode(tokenizer, prompt, g, history=()):
    """Prompt text -> token ids, through the chat template when --chat."""
    if not g.chat:
        return tokenizer(prompt)["input_ids"]
    system = [{"role": "system", "content": g.system}] if g.system else []
    return chat_ids(tokenizer, system + list(history) + [{"role": "user", "content": prompt}])


def sampling_of(greedy, temperature, top_k, top_p):
    """generate()'s sampling arguments: greedy when asked or at temperature 0."""
    return dict(do_sample=False) if greedy or temperature == 0 else dict(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)


def stops_and_eos(tokenizer, stop, chat):
    """(stop strings, end token ids): EOS, and for a chat the template's end of turn (e.g. <|im_end|>), as a
    token where it is one, else as a stop string."""
    from CHAT import end_of_turn
    stops, eos = list(stop), [tokenizer.eos_token_id]
    if chat and tokenizer.chat_template:
        turn_end, turn_end_id = end_of_turn(tokenizer)
        eos += [turn_end_id] if turn_end_id is not None else []
        stops += [turn_end] if turn_end and turn_end_id is None else []
    return stops, eos


def generate(model, tokenizer, batch_ids, max_new, eos, stops, sampling, **kw):
    """Token-id lists -> new token ids per prompt (rows left-padded: each ends where generation starts).
    kw: a streamer, stopping_criteria."""
    import torch
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids):], mask[row, width - len(ids):] = torch.tensor(ids), 1
    extra = dict(stop_strings=stops, tokenizer=tokenizer) if stops else {}
    with torch.inference_mode():
        out = model.generate(input_ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **sampling, **extra, **kw)
    return out[:, width:].tolist()


def prompt_end(tokenizer, ids, stops):
    """The prompt's last characters, where a stop string could begin (see cut_at_stop)."""
    return tokenizer.decode(ids, skip_special_tokens=True)[-max(map(len, stops), default=0):] if stops else ""


def completion(tokenizer, prompt_ids, new_ids, eos, stops):
    """New token ids -> (the answer's text, its token count, whether it ended at an end token or stop string)."""
    ends = [new_ids.index(e) for e in eos if e in new_ids]
    ids = new_ids[:min(ends, default=len(new_ids))]
    text, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stops,
                                prompt_end(tokenizer, prompt_ids, stops))
    return text, len(ids), bool(ends) or stopped


def fit_context(ids, max_new_tokens, context, warned):
    """Keep the tail of a prompt that leaves no room for max_new_tokens in the context window."""
    max_new_tokens = min(max_new_tokens, context - 1)
    room = context - max_new_tokens
    if len(ids) > room and not warned:
        log(f"warning: a prompt of {len(ids)} tokens is too long; keeping its last {room} so that "
            f"{max_new_tokens} new tokens fit the model's context of {context}")
        warned.append(True)
    return ids[-room:], max_new_tokens


def main(argv):
    cfg, flags, _ = CONFIG.load(argv, CONFIG.INFER_SECTIONS, description=__doc__, config_default=None)
    g = cfg.infer
    if "model.name" not in flags:
        raise UserError("--model is required: a directory written by TRAIN.py (e.g. --model out) or a hub id")
    if g.jsonl and not g.each_line:
        raise UserError("--jsonl needs --each-line (one JSON object per input line)")
    if g.serve and (g.prompt is not None or g.each_line):
        raise UserError("--serve answers HTTP requests: drop --prompt / --each-line")
    interactive = g.prompt is None and not g.each_line and not g.serve and sys.stdin.isatty()
    prompt = g.prompt if g.prompt is not None or g.each_line or interactive or g.serve else read_prompt(sys.stdin)
    if prompt is not None and not prompt.strip():
        raise UserError("empty prompt - pass --prompt TEXT or pipe text on stdin")

    import torch
    from MODEL import context_length, load_for_use
    if g.serve:  # an OpenAI-compatible HTTP API instead of stdout (SERVE.py); its packages are checked first
        from SERVE import serve
        return serve(cfg, lambda: load_for_use(cfg.model, "generate")[:2])
    model, tokenizer, device = load_for_use(cfg.model, "generate")
    context, warned = context_length(model.config), []
    sampling = sampling_of(g.greedy, g.temperature, g.top_k, g.top_p)
    stops, eos = stops_and_eos(tokenizer, g.stop, g.chat)
    if g.seed is not None:
        torch.manual_seed(g.seed)

    def run(batch_ids, streamer=None):
        fitted = [fit_context(ids, g.max_new_tokens, context, warned) for ids in batch_ids]
        if streamer:
            streamer.prefix = prompt_end(tokenizer, fitted[0][0], stops)
        return generate(model, tokenizer, [ids for ids, _ in fitted], fitted[0][1], eos, stops, sampling,
                        streamer=streamer)

    if g.each_line:  # batched; with --greedy identical to answering the lines one by one
        lines = [line.rstrip("\n") for line in sys.stdin]
        for start in range(0, len(lines), g.batch_size):
            chunk = lines[start:start + g.batch_size]
            encoded = [encode(tokenizer, p, g) if p.strip() else [] for p in chunk]
            todo = [i for i, ids in enumerate(encoded) if ids]
            answers = dict(zip(todo, run([encoded[i] for i in todo]))) if todo else {}
            for i, p in enumerate(chunk):
                text, n_new, _ = completion(tokenizer, encoded[i], answers[i], eos, stops) if i in answers else ("", 0, 0)
                record = {"prompt": p, "completion": text, "prompt_tokens": len(encoded[i]), "completion_tokens": n_new}
                print(json.dumps(record, ensure_ascii=False) if g.jsonl else text.replace("\n", " "), flush=True)
        return

    streamer = make_streamer(tokenizer, stops, sys.stdout)
    if not interactive:
        run([encode(tokenizer, prompt, g)], streamer)
        return
    log(f"{cfg.model.name}: type a prompt, Enter to generate, Ctrl-D to quit")
    history = []
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            log("")
            return
        if line.strip():
            run([encode(tokenizer, line.rstrip("\n"), g, history)], streamer)
            history += [{"role": "user", "content": line.rstrip("\n")}, {"role": "assistant", "content": streamer.final}]


if __name__ == "__main__":
    CONFIG.main_guard(main)
