"""An OpenAI-compatible HTTP API for a model, on FastAPI + uvicorn: `python INFER.py --model out --serve`.

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the loaded model
    POST /v1/chat/completions    messages, max_tokens, temperature, top_p, stop, seed, stream, logprobs, top_logprobs
    POST /v1/completions         prompt (text, token ids, or a list of either), the same options, echo, logprobs
    GET  /tokenizer_info, POST /tokenize, POST /detokenize    the tokenizer, as vLLM serves it (lm-eval uses it)

Generation is GENERATE.py's, as for INFER.py (chat template, end of turn, stop strings, sampling): a greedy chat
completion is INFER.py --chat --greedy's answer, token for token. Requests that arrive together generate
together (SCHEDULER.py); log-probabilities are EVAL.py's. A parameter this server does not honour is refused
with a 400 that names it, never ignored. Errors are OpenAI-shaped JSON: {"error": {"message", "type", "param",
"code"}}; a full queue is a 503 with Retry-After.
"""
import asyncio
import dataclasses
import json
import os
import queue
import threading
import time
import types
import uuid

import uvicorn  # fastapi and uvicorn: optional, checked by INFER.py --serve before it imports this file
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

import GENERATE
import SCHEDULER
from CHAT import ROLES
from CONFIG import UserError, log

SAMPLING = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream", "n"}
ACCEPTED = {"chat": SAMPLING | {"messages", "logprobs", "top_logprobs"}, "completion": SAMPLING | {"prompt", "echo", "logprobs"}}


class RequestError(Exception):
    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers


def number(body, key, default, low, high, kind=(int, float)):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise RequestError(400, f"'{key}' must be {what} from {low} to {high}, not {json.dumps(value)}", key)
    return value


@dataclasses.dataclass
class Served:
    """What every request needs: the model, its tokenizer, its id, its context, and the queue."""
    model: object
    tokenizer: object
    name: str
    context: int
    waiting: SCHEDULER.Waiting


def options(body, srv, longest_prompt, chat):
    """The request's generation options, checked. -> (GENERATE.Options, seed)"""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    room = max(srv.context - longest_prompt, 0)
    max_tokens = room if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise RequestError(400, f"'max_tokens' must be an integer >= 0, not {json.dumps(max_tokens)}", "max_tokens")
    if max_tokens > room or (room == 0 and not body.get("echo")):
        raise RequestError(400, f"the model's context is {srv.context} tokens: {longest_prompt} in the prompt leave "
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
    stops, eos = GENERATE.stops_and_eos(srv.tokenizer, stop, chat)
    return GENERATE.Options(max_tokens, GENERATE.sampling_of(False, temperature, 0, top_p or 1e-9), stops, eos), seed


def wanted_logprobs(body, chat):
    """How many alternatives per token the request wants, or None for no log-probabilities."""
    if chat:
        if not isinstance(body.get("logprobs", False), bool):
            raise RequestError(400, "'logprobs' must be true or false", "logprobs")
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top = number(body, "top_logprobs", 0, 0, 20, int) if body.get("logprobs") else None
    else:
        top = number(body, "logprobs", None, 0, 20, int)
        if not isinstance(body.get("echo", False), bool):
            raise RequestError(400, "'echo' must be true or false", "echo")
    if top is not None and body.get("stream"):
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


def error(status, message, param=None, code=None, headers=None):
    """An OpenAI-shaped error response."""
    kind = {401: "authentication_error", 404: "not_found_error", 500: "server_error",
            503: "service_unavailable"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


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


def finish_reason(row):
    return "stop" if row.ended or row.n_tokens < row.opts.max_new_tokens else "length"


def shapes(srv, chat, jobs, streaming):
    """-> (envelope(choices, **extra), usage()): the response's outer shape and its token counts."""
    rid, created = uuid.uuid4().hex, int(time.time())
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if streaming and chat else "")

    def envelope(choices, **extra):
        return {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "object": kind, "created": created,
                "model": srv.name, "choices": choices, **extra}

    def usage():
        p, c = sum(len(j.row.prompt_ids) for j in jobs), sum(j.row.n_tokens for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    return envelope, usage


def choice(srv, index, job, text, chat):
    """One answered prompt as a choice of the response (text: the prompt's, for echo)."""
    row, tok = job.row, srv.tokenizer
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": row.text}, "finish_reason": finish_reason(row),
                "logprobs": chat_logprobs(tok, job.logprobs) if job.top is not None else None}
    return {"index": index, "text": (text if job.echo else "") + row.text, "finish_reason": finish_reason(row),
            "logprobs": completion_logprobs(tok, job.logprobs) if job.top is not None else None}


def enqueue(srv, jobs):
    if not SCHEDULER.submit(srv.waiting, jobs):
        raise RequestError(503, f"the server is busy: its queue of {srv.waiting.max_waiting} is full - retry shortly",
                           code="server_busy", headers={"Retry-After": "1"})


async def events(srv, job, chat, pieces):
    """The server-sent events of one streamed answer: the worker puts its text on `pieces` as it comes, then the
    finished future; when the client disconnects this generator is closed, and `finally` takes the job out of
    the queue (or stops its row)."""
    envelope, usage, loop = *shapes(srv, chat, [job], True), asyncio.get_running_loop()
    delta = (lambda text: {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": None}) if chat else \
        (lambda text: {"index": 0, "text": text, "logprobs": None, "finish_reason": None})
    try:
        if chat:
            yield f"data: {json.dumps(envelope([{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]))}\n\n"
        while True:
            item = await loop.run_in_executor(None, pieces.get)
            if isinstance(item, str):
                yield f"data: {json.dumps(envelope([delta(item)]))}\n\n"
                continue
            if item.exception():
                last = {"error": {"message": f"{type(item.exception()).__name__}: {item.exception()}",
                                  "type": "server_error"}}
            else:
                last = envelope([{**delta(""), "finish_reason": finish_reason(job.row)}], usage=usage())
            yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
            break
    finally:
        SCHEDULER.withdraw(srv.waiting, [job])  # a client that disconnected ends up here too


async def respond(srv, jobs, texts, chat, stream):
    if stream:  # the sink first: the worker may start on the job as soon as it is queued
        pieces = queue.Queue()
        jobs[0].row.sink = types.SimpleNamespace(write=pieces.put, flush=lambda: None)
        jobs[0].future.add_done_callback(pieces.put)
        enqueue(srv, jobs)
        return StreamingResponse(events(srv, jobs[0], chat, pieces), media_type="text/event-stream")
    enqueue(srv, jobs)
    try:  # the event loop keeps serving (health, other requests) while the worker generates
        done = await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
    except asyncio.CancelledError:  # the client went away before its answer
        SCHEDULER.withdraw(srv.waiting, jobs)
        raise
    envelope, usage = shapes(srv, chat, jobs, False)
    return JSONResponse(envelope([choice(srv, i, job, text, chat) for i, (job, text) in enumerate(zip(done, texts))],
                                 usage=usage()))


async def json_of(request):
    try:
        body = await request.json()
    except ValueError:
        raise RequestError(400, "the request body must be JSON")
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


async def body_of(request, name, kind):
    """A completions request's body, checked: JSON, only parameters this server honours, this model."""
    body = await json_of(request)
    unknown = sorted(set(body) - ACCEPTED[kind])
    if unknown:
        raise RequestError(400, f"'{unknown[0]}' is not supported by this server - drop it", unknown[0])
    if body.get("model") not in (None, name):
        raise RequestError(404, f"model '{body['model']}' is not served here; this server has '{name}'", "model",
                           "model_not_found")
    return body


def make_app(srv, api_key):
    """The FastAPI application: routes, the API key check and the error handlers."""
    app = FastAPI()

    @app.middleware("http")
    async def key(request: Request, call_next):
        if api_key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "a valid API key is required: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def bad_request(request, e):
        return error(e.status, str(e), e.param, e.code, e.headers)

    @app.exception_handler(UserError)
    async def user_error(request, e):  # e.g. a chat request to a model without a chat template
        return error(400, str(e))

    @app.exception_handler(Exception)
    async def server_error(request, e):  # one line in the log and to the client, never a traceback
        log(f"error: {request.url.path}: {type(e).__name__}: {e}")
        return error(500, f"{type(e).__name__}: {e}")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": 0, "owned_by": "llm-mini"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request, srv.name, "chat")
        ids, top = GENERATE.chat_ids(srv.tokenizer, messages_of(body)), wanted_logprobs(body, chat=True)
        opts, seed = options(body, srv, len(ids), chat=True)
        return await respond(srv, [SCHEDULER.Job(GENERATE.Row(ids, opts), seed, top)], [""], True, bool(body.get("stream")))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, srv.name, "completion")
        prompts, top = prompts_of(body, srv.tokenizer), wanted_logprobs(body, chat=False)
        if len(prompts) > 1 and body.get("stream"):
            raise RequestError(400, "'stream' takes a single prompt", "stream")
        opts, seed = options(body, srv, max(len(ids) for _, ids in prompts), chat=False)
        echo = bool(body.get("echo"))
        jobs = [SCHEDULER.Job(GENERATE.Row(ids, opts), seed, top, echo) for _, ids in prompts]
        return await respond(srv, jobs, [text for text, _ in prompts], False, bool(body.get("stream")))

    @app.get("/tokenizer_info")
    def tokenizer_info():
        tok = srv.tokenizer
        return {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "chat_template": tok.chat_template, "model_max_length": srv.context}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await json_of(request)
        if not isinstance(body.get("prompt"), str):
            raise RequestError(400, "'prompt' must be a string", "prompt")
        ids = srv.tokenizer(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": srv.context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        tokens = (await json_of(request)).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < len(srv.tokenizer) for t in tokens):
            raise RequestError(400, "'tokens' must be a list of token ids", "tokens")
        return {"prompt": srv.tokenizer.decode(tokens)}
    return app


def serve(cfg):
    """Load the model and serve it until Ctrl-C, on --host:--port, with --api-key (or $LLM_MINI_API_KEY)."""
    model, tokenizer = GENERATE.load(cfg.model)
    g, name = cfg.infer, cfg.model.name
    api_key = g.api_key or os.environ.get("LLM_MINI_API_KEY")
    if not tokenizer.chat_template:
        log("note: the tokenizer has no chat template: /v1/chat/completions answers 400, /v1/completions works")
    srv = Served(model, tokenizer, name, GENERATE.context_of(model),
                 SCHEDULER.Waiting(g.batch_size, g.max_waiting, GENERATE.context_of(model)))
    threading.Thread(target=SCHEDULER.work, args=(srv,), daemon=True, name="generate").start()
    log(f"serving {name} at http://{g.host}:{g.port}/v1 ({'API key required' if api_key else 'no API key'}; "
        f"up to {g.batch_size} requests generate together, {g.max_waiting} may wait); Ctrl-C to stop")
    uvicorn.run(make_app(srv, api_key), host=g.host, port=g.port, log_level="warning")
