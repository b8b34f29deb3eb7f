"""Generate text with a trained model. Only generated text goes to stdout; everything else to stderr.

    python INFER.py --model out --prompt "Once upon a time"
    echo "Once upon a time" | python INFER.py --model out         # all of stdin is one prompt
    python INFER.py --model out --each-line --jsonl < prompts.txt   # one answer per line, batched
    python INFER.py --model out                                     # at a terminal: a "> " loop until Ctrl-D
    python INFER.py --model chat-model --chat --system "Be brief." --prompt "Hi" --stop "User:"
    python INFER.py --model out --serve --port 8000                 # an OpenAI-compatible API (SERVE.py)

--chat renders the prompt with the tokenizer's chat template, exactly as TRAIN.py rendered conversations,
and stops at the template's end of turn (e.g. <|im_end|>) as well as at EOS. Generation itself is GENERATE.py.
"""
import dataclasses
import json
import sys

import CONFIG
import FLAGS
import REPORT
import SETTINGS
from REPORT import UserError, log


def stdin_prompt(stdin):
    """All of stdin as one prompt."""
    text = stdin.read()
    if text.endswith("\n"):  # `echo` adds one; training samples are lines without it
        text = text[:-1]
    return text


USAGE = "python INFER.py --model out --prompt \"…\" (a directory written by TRAIN.py, or a hub id)"


def main(argv):
    cfg, resolved = SETTINGS.load(argv, CONFIG.INFER_SECTIONS, __doc__, None, ("model.name",), USAGE)
    if resolved.print_only:
        return FLAGS.print_config(cfg, resolved)
    g = cfg.infer
    if g.jsonl and not g.each_line:
        raise UserError("--jsonl needs --each-line (one JSON object per input line)")
    if g.serve and (g.prompt is not None or g.each_line):
        raise UserError("--serve answers HTTP requests: drop --prompt / --each-line")
    interactive = g.prompt is None and not g.each_line and not g.serve and sys.stdin.isatty()
    prompt = g.prompt if g.prompt is not None or g.each_line or interactive or g.serve else stdin_prompt(sys.stdin)
    if prompt is not None and not prompt.strip():
        raise UserError("empty prompt - pass --prompt TEXT or pipe text on stdin")
    if g.serve:  # an OpenAI-compatible HTTP API instead of stdout; its packages are checked before anything loads
        REPORT.need("fastapi", "--serve", "fastapi uvicorn")
        REPORT.need("uvicorn", "--serve", "fastapi uvicorn")
        import SERVE  # only now: it needs fastapi and uvicorn, and brings torch
        return SERVE.serve(cfg)

    import torch  # with GENERATE: only now that the arguments are checked (importing them takes seconds)
    import DECODE
    import GENERATE
    model, tokenizer = GENERATE.load(cfg.model, DECODE.chosen(g.decode, False))
    compiled = DECODE.compiled_step(model) if DECODE.chosen(g.decode, False) else None
    context, warned = GENERATE.context_of(model), []
    stops, eos = GENERATE.stops_and_eos(tokenizer, g.stop, g.chat)
    opts = GENERATE.Options(g.max_new_tokens, GENERATE.sampling_of(g.greedy, g.temperature, g.top_k, g.top_p),
                            stops, eos)
    if g.seed is not None:
        torch.manual_seed(g.seed)

    def answer(batch_ids, sink=None):
        """The prompts' rows, answered together (each prompt's tail kept where it would not fit)."""
        fitted = [GENERATE.fit_context(ids, g.max_new_tokens, context, warned) for ids in batch_ids]
        return GENERATE.generate(model, tokenizer, [
            GENERATE.Row(ids, dataclasses.replace(opts, max_new_tokens=n), sink) for ids, n in fitted], compiled)

    if g.each_line:  # batched; with --greedy identical to answering the lines one by one
        lines = [line.rstrip("\n") for line in sys.stdin]
        for start in range(0, len(lines), g.batch_size):
            chunk = lines[start:start + g.batch_size]
            encoded = [GENERATE.prompt_ids(tokenizer, p, g) if p.strip() else [] for p in chunk]
            todo = [i for i, ids in enumerate(encoded) if ids]
            answers = dict(zip(todo, answer([encoded[i] for i in todo]))) if todo else {}
            for i, p in enumerate(chunk):
                text, n_new = (answers[i].text, answers[i].n_tokens) if i in answers else ("", 0)
                record = {"prompt": p, "completion": text, "prompt_tokens": len(encoded[i]), "completion_tokens": n_new}
                print(json.dumps(record, ensure_ascii=False) if g.jsonl else text.replace("\n", " "), flush=True)
        return

    if not interactive:
        answer([GENERATE.prompt_ids(tokenizer, prompt, g)], sys.stdout)
        print(flush=True)
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
            row = answer([GENERATE.prompt_ids(tokenizer, line.rstrip("\n"), g, history)], sys.stdout)[0]
            print(flush=True)
            history += [{"role": "user", "content": line.rstrip("\n")}, {"role": "assistant", "content": row.text}]


if __name__ == "__main__":
    REPORT.main_guard(main)
