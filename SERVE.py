"""An OpenAI-compatible HTTP API for a model, on FastAPI + uvicorn: `python INFER.py --model out --serve`.

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the loaded model
    POST /v1/chat/completions    messages, max_tokens, temperature, top_p, stop, seed, stream
    POST /v1/completions         prompt, the same options

Generation is INFER.py's (loading, chat template, end of turn, stop strings, sampling): a greedy chat
completion is INFER.py --chat --greedy's answer, token for token. One request generates at a time (a lock:
the model is not shared between threads); a streaming client that disconnects stops its generation.
Errors are OpenAI-shaped JSON with a 4xx status: {"error": {"message", "type", "param", "code"}}.
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

import CONFIG
from CONFIG import UserError, log

ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def number(body, key, default, low, high):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be a number from {low} to {high}, not {json.dumps(value)}", key)
    return value


def read_options(body, prompt_len, context):
    """The request's generation options, checked. -> (max_tokens, sampling, stop strings, seed, stream)"""
    from INFER import sampling_of
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    room = context - prompt_len
    if max_tokens is None:
        max_tokens = room
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, f"'max_tokens' must be a positive integer, not {json.dumps(max_tokens)}", "max_tokens")
    if max_tokens > room:
        raise RequestError(400, f"the model's context is {context} tokens: {prompt_len} in the prompt leave room "
                                f"for {max(room, 0)}, and max_tokens asks for {max_tokens}", "max_tokens",
                           "context_length_exceeded")
    temperature = number(body, "temperature", 1.0, 0, 2)
    top_p = number(body, "top_p", 1.0, 0, 1)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"'seed' must be an integer, not {json.dumps(seed)}", "seed")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    return max_tokens, sampling_of(False, temperature, 0, top_p or 1e-9), stop, seed, bool(body.get("stream"))


def read_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(400, f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a "
                                    f"string}}", f"messages[{i}]")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_prompt(body):
    prompt = body.get("prompt")
    prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
    return prompt


@dataclasses.dataclass
class Served:
    """What every request needs: the model, its tokenizer, its id, its context, and the generation lock."""
    model: object
    tokenizer: object
    name: str
    context: int
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def error(status, message, param=None, code=None):
    """An OpenAI-shaped error response."""
    from fastapi.responses import JSONResponse
    kind = {401: "authentication_error", 404: "not_found_error", 500: "server_error"}.get(status,
                                                                                         "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def answer(srv, prompt_ids, opts, stops, eos, on_text=None, cancel=None):
    """Generate under the lock (one request at a time), streaming text to on_text.write when given, stopping
    early once `cancel` is set. -> (text, completion tokens, finish_reason)"""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from INFER import completion, generate, make_streamer, prompt_end

    class Cancelled(StoppingCriteria):  # set by a client that went away
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)
    max_tokens, sampling, _, seed, _ = opts
    cancel = cancel or threading.Event()
    streamer = make_streamer(srv.tokenizer, stops, on_text, end="") if on_text else None
    if streamer:
        streamer.prefix = prompt_end(srv.tokenizer, prompt_ids, stops)
    with srv.lock:
        if seed is not None:
            torch.manual_seed(seed)
        new = generate(srv.model, srv.tokenizer, [prompt_ids], max_tokens, eos, stops, sampling, streamer=streamer,
                       stopping_criteria=StoppingCriteriaList([Cancelled()]))[0]
    text, n, ended = completion(srv.tokenizer, prompt_ids, new, eos, stops)
    if cancel.is_set():
        log(f"client went away: generation stopped after {len(new)} of at most {max_tokens} tokens")
    return text, n, "stop" if ended or n < max_tokens else "length"


def shapes(name, chat, n_prompt, streaming):
    """-> (choice(text, finish, delta), envelope(choices, **extra), usage(n)): the response objects' shapes."""
    rid, created = uuid.uuid4().hex, int(time.time())
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if streaming and chat else "")

    def choice(text, finish, delta=False):
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        message = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
        return {"index": 0, "delta" if delta else "message": message, "finish_reason": finish}

    def envelope(choices, **extra):
        return {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "object": kind, "created": created, "model": name,
                "choices": choices, **extra}
    return choice, envelope, lambda n: {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


async def events(srv, prompt_ids, opts, stops, eos, chat):
    """The server-sent events of a streamed answer. Generation runs in a worker thread and hands text over a
    queue; when the client disconnects this generator is closed, and `finally` stops the generation."""
    choice, envelope, usage = shapes(srv.name, chat, len(prompt_ids), True)
    pieces, cancel, loop = queue.Queue(), threading.Event(), asyncio.get_running_loop()
    sink = types.SimpleNamespace(write=lambda text: pieces.put(text) if text else None, flush=lambda: None)

    def work():
        try:
            pieces.put(("end",) + answer(srv, prompt_ids, opts, stops, eos, sink, cancel))
        except Exception as e:  # noqa: BLE001 - reported to the client as the stream's last event
            pieces.put(("failed", f"{type(e).__name__}: {e}"))
    worker = loop.run_in_executor(None, work)
    try:
        if chat:
            yield f"data: {json.dumps(envelope([{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]))}\n\n"
        while True:
            item = await loop.run_in_executor(None, pieces.get)
            if isinstance(item, str):
                yield f"data: {json.dumps(envelope([choice(item, None, delta=True)]))}\n\n"
                continue
            last = envelope([choice("", item[3], delta=True)], usage=usage(item[2])) if item[0] == "end" else \
                {"error": {"message": item[1], "type": "server_error"}}
            yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
            break
    finally:
        cancel.set()  # a client that disconnected ends up here too: its generation stops at the next token
        await worker


async def respond(srv, prompt_ids, opts, stops, eos, chat):
    from fastapi.responses import JSONResponse, StreamingResponse
    if opts[4]:
        return StreamingResponse(events(srv, prompt_ids, opts, stops, eos, chat), media_type="text/event-stream")
    choice, envelope, usage = shapes(srv.name, chat, len(prompt_ids), False)
    # in a worker thread: the server keeps answering (health, queued requests) meanwhile
    text, n, finish = await asyncio.get_running_loop().run_in_executor(None, answer, srv, prompt_ids, opts, stops, eos)
    return JSONResponse(envelope([choice(text, finish)], usage=usage(n)))


async def body_of(request, name):
    try:
        body = await request.json()
    except ValueError:
        raise RequestError(400, "the request body must be JSON")
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, name):
        raise RequestError(404, f"model '{body['model']}' is not served here; this server has '{name}'", "model",
                           "model_not_found")
    return body


def make_app(srv, api_key):
    """The FastAPI application: routes, the API key check and the error handlers."""
    from fastapi import FastAPI, Request
    from INFER import chat_ids, stops_and_eos
    app = FastAPI()

    @app.middleware("http")
    async def key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "a valid API key is required: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def bad_request(request, e):
        return error(e.status, str(e), e.param, e.code)

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
        body = await body_of(request, srv.name)
        prompt_ids = chat_ids(srv.tokenizer, read_messages(body))
        opts = read_options(body, len(prompt_ids), srv.context)
        return await respond(srv, prompt_ids, opts, *stops_and_eos(srv.tokenizer, opts[2], chat=True), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, srv.name)
        prompt_ids = srv.tokenizer(read_prompt(body))["input_ids"]
        opts = read_options(body, len(prompt_ids), srv.context)
        return await respond(srv, prompt_ids, opts, *stops_and_eos(srv.tokenizer, opts[2], chat=False), chat=False)
    return app


def serve(cfg, load):
    """Serve the model load() returns until Ctrl-C, on --host:--port, with --api-key (or $LLM_MINI_API_KEY)."""
    CONFIG.need("fastapi", "--serve", "fastapi uvicorn")
    uvicorn = CONFIG.need("uvicorn", "--serve", "fastapi uvicorn")
    model, tokenizer = load()
    g, name = cfg.infer, cfg.model.name
    api_key = g.api_key or os.environ.get("LLM_MINI_API_KEY")
    if not tokenizer.chat_template:
        log("note: the tokenizer has no chat template: /v1/chat/completions answers 400, /v1/completions works")
    log(f"serving {name} at http://{g.host}:{g.port}/v1 ({'API key required' if api_key else 'no API key'}); "
        "Ctrl-C to stop")
    from MODEL import context_length
    srv = Served(model, tokenizer, name, context_length(model.config))
    uvicorn.run(make_app(srv, api_key), host=g.host, port=g.port, log_level="warning")
