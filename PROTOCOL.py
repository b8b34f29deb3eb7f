"""The OpenAI-compatible protocol SERVE.py speaks: what a request may hold, checked (a 400 that names the field,
never a parameter silently ignored), and the shapes of the responses, log-probabilities included.
"""
import json
import time
import uuid

import GENERATE
from CHAT import ROLES

SAMPLING = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream", "n"}
ACCEPTED = {"chat": SAMPLING | {"messages", "logprobs", "top_logprobs"}, "completion": SAMPLING | {"prompt", "echo", "logprobs"}}


def unsupported(body, kind):
    """Refuse the first parameter of a "chat" or "completion" request that this server does not honour."""
    unknown = sorted(set(body) - ACCEPTED[kind])
    if unknown:
        raise RequestError(400, f"'{unknown[0]}' is not supported by this server - drop it", unknown[0])


class RequestError(Exception):
    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers


def no_lone_surrogates(body):
    """Refuse a string holding a lone UTF-16 surrogate ("\\ud800" is valid JSON but no text: nothing can encode
    it), wherever it is in the body, naming where. Iterative: a deeply nested body costs no recursion."""
    pending = [(body, "")]
    while pending:
        value, path = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, f"'{path}' holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                                        "text - send valid Unicode", path.split(".")[0].split("[")[0])
        elif isinstance(value, dict):
            pending += [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            pending += [(v, f"{path}[{i}]") for i, v in enumerate(value)]


def flag(body, key):
    """A true/false parameter: JSON's true or false (or absent), never a string or a number taken as one."""
    value = body.get(key, False)
    if value is not None and not isinstance(value, bool):
        raise RequestError(400, f"'{key}' must be true or false, not {json.dumps(value)}", key)
    return bool(value)


def number(body, key, default, low, high, kind=(int, float)):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise RequestError(400, f"'{key}' must be {what} from {low} to {high}, not {json.dumps(value)}", key)
    return value


def options(body, tokenizer, context, longest_prompt, chat):
    """The request's generation options, checked, for a model of `context` tokens. -> (GENERATE.Options, seed)"""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    room = max(context - longest_prompt, 0)
    max_tokens = room if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise RequestError(400, f"'max_tokens' must be an integer >= 0, not {json.dumps(max_tokens)}", "max_tokens")
    if max_tokens > room or (room == 0 and not body.get("echo")):
        raise RequestError(400, f"the model's context is {context} tokens: {longest_prompt} in the prompt leave "
                                f"room for {room}, and max_tokens asks for {max_tokens}", "max_tokens",
                           "context_length_exceeded")
    if max_tokens == 0 and not body.get("echo"):
        raise RequestError(400, "'max_tokens' 0 generates nothing: it needs 'echo' (to score the prompt)", "max_tokens")
    temperature, top_p = number(body, "temperature", 1.0, 0, 2), number(body, "top_p", 1.0, 0, 1)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    seed = number(body, "seed", None, -2**63, 2**63 - 1, int)
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    stops, eos = GENERATE.stops_and_eos(tokenizer, stop, chat)
    return GENERATE.Options(max_tokens, GENERATE.sampling_of(False, temperature, 0, top_p or 1e-9), stops, eos), seed


def wanted_logprobs(body, chat):
    """How many alternatives per token the request wants, or None for no log-probabilities."""
    if chat:
        wanted = flag(body, "logprobs")
        if body.get("top_logprobs") is not None and not wanted:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top = number(body, "top_logprobs", 0, 0, 20, int) if wanted else None
    else:
        top = number(body, "logprobs", None, 0, 20, int)
        flag(body, "echo")
    if top is not None and flag(body, "stream"):
        raise RequestError(400, "log-probabilities are not streamed - drop 'stream' or 'logprobs'", "logprobs")
    return top


def messages_of(body):
    """The conversation; a message's content is a string or a list of text parts, as OpenAI clients send it."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) for p in content):
            other = [p.get("type") for p in content if p.get("type") != "text" or not isinstance(p.get("text"), str)]
            if other:
                raise RequestError(400, f"messages[{i}]: content parts of type {other[0]!r} are not supported - "
                                        "send text parts ({\"type\": \"text\", \"text\": …})", f"messages[{i}]")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise RequestError(400, f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a "
                                    f"string or a list of text parts}}", f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    return out


def prompts_of(body, tokenizer):
    """[(prompt text, token ids)] of a completions request: a string, a list of strings, a list of token ids, or
    a list of lists of token ids (what lm-evaluation-harness sends)."""
    prompt = body.get("prompt")
    ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)  # noqa: E731
    prompts = [prompt] if isinstance(prompt, str) or ids(prompt) else prompt
    if not isinstance(prompts, list) or not prompts or not all((isinstance(p, str) and p) or ids(p) for p in prompts):
        raise RequestError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of those",
                           "prompt")
    out = []
    for p in prompts:
        if isinstance(p, list) and not all(0 <= t < len(tokenizer) for t in p):
            raise RequestError(400, f"'prompt' holds token ids outside the vocabulary (0 to {len(tokenizer) - 1})",
                               "prompt")
        out.append((p, tokenizer(p)["input_ids"]) if isinstance(p, str) else (tokenizer.decode(p), p))
    return out


def completion_logprobs(tokenizer, entries):
    """OpenAI's completions logprobs: tokens, token_logprobs (null for the first prompt token), top_logprobs
    ({token: logprob}) and text_offset (where each token starts in the returned text)."""
    tokens = [tokenizer.decode([i]) for i, _, _ in entries]
    offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    top = [None if alts is None else {tokenizer.decode([i]): lp for i, lp in alts} for _, _, alts in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer, entries):
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def one(i, lp):
        text = tokenizer.decode([i])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**one(i, lp), "top_logprobs": [one(j, l) for j, l in alts]} for i, lp, alts in entries]}


def finish_reason(job):
    return "stop" if job.answer.ended or job.answer.n_tokens < job.row.opts.max_new_tokens else "length"


def shapes(name, chat, jobs, streaming):
    """-> (envelope(choices, **extra), usage()): the response's outer shape and its token counts."""
    rid, created = uuid.uuid4().hex, int(time.time())
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if streaming and chat else "")

    def envelope(choices, **extra):
        return {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "object": kind, "created": created,
                "model": name, "choices": choices, **extra}

    def usage():
        p, c = sum(len(j.row.prompt_ids) for j in jobs), sum(j.answer.n_tokens for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    return envelope, usage


def choice(tokenizer, index, job, text, chat):
    """One answered prompt as a choice of the response (text: the prompt's, for echo)."""
    answer, tok = job.answer, tokenizer
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": answer.text}, "finish_reason": finish_reason(job),
                "logprobs": chat_logprobs(tok, job.logprobs) if job.top is not None else None}
    return {"index": index, "text": (text if job.echo else "") + answer.text, "finish_reason": finish_reason(job),
            "logprobs": completion_logprobs(tok, job.logprobs) if job.top is not None else None}
