"""An OpenAI-compatible HTTP API for a model, on FastAPI + uvicorn: `python INFER.py --model out --serve`.

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the loaded model
    POST /v1/chat/completions    messages, max_tokens, temperature, top_p, stop, seed, stream
    POST /v1/completions         prompt, the same options

Generation is GENERATE.py's, as for INFER.py (loading, chat template, end of turn, stop strings, sampling): a greedy chat
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
from typing import Optional

import torch
import uvicorn  # fastapi and uvicorn: optional, checked by INFER.py --serve before it imports this file
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import StoppingCriteria, StoppingCriteriaList

import GENERATE
from CHAT import ROLES
from CONFIG import UserError, log


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


@dataclasses.dataclass(frozen=True)
class Job:
    """One request to answer, checked: the prompt's token ids and how to generate its answer."""
    prompt_ids: list
    opts: GENERATE.Options
    seed: Optional[int]
    stream: bool
    chat: bool


def read_job(body, srv, prompt_ids, chat):
    """The request's generation options, checked, as a Job."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    room = srv.context - len(prompt_ids)
    if max_tokens is None:
        max_tokens = room
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, f"'max_tokens' must be a positive integer, not {json.dumps(max_tokens)}", "max_tokens")
    if max_tokens > room:
        raise RequestError(400, f"the model's context is {srv.context} tokens: {len(prompt_ids)} in the prompt leave "
                                f"room for {max(room, 0)}, and max_tokens asks for {max_tokens}", "max_tokens",
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
    stops, eos = GENERATE.stops_and_eos(srv.tokenizer, stop, chat)
    opts = GENERATE.Options(max_tokens, GENERATE.sampling_of(False, temperature, 0, top_p or 1e-9), stops, eos)
    return Job(prompt_ids, opts, seed, bool(body.get("stream")), chat)


def messages_of(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(400, f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a "
                                    f"string}}", f"messages[{i}]")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_of(body):
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
    kind = {401: "authentication_error", 404: "not_found_error", 500: "server_error"}.get(status,
                                                                                         "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class Cancelled(StoppingCriteria):
    """Stops generation once `event` is set (by a client that went away)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kw):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def answer(srv, job, on_text=None, cancel=None):
    """Generate under the lock (one request at a time), streaming text to on_text.write when given, stopping
    early once `cancel` is set. -> (text, completion tokens, finish_reason)"""
    cancel = cancel or threading.Event()
    streamer = GENERATE.StopStreamer(srv.tokenizer, job.opts.stops, on_text, after="") if on_text else None
    if streamer:
        streamer.prefix = GENERATE.prompt_end(srv.tokenizer, job.prompt_ids, job.opts.stops)
    with srv.lock:
        if job.seed is not None:
            torch.manual_seed(job.seed)
        new = GENERATE.generate(srv.model, srv.tokenizer, [job.prompt_ids], job.opts, streamer=streamer,
                                stopping_criteria=StoppingCriteriaList([Cancelled(cancel)]))[0]
    text, n, ended = GENERATE.completion(srv.tokenizer, job.prompt_ids, new, job.opts)
    if cancel.is_set():
        log(f"client went away: generation stopped after {len(new)} of at most {job.opts.max_new_tokens} tokens")
    return text, n, "stop" if ended or n < job.opts.max_new_tokens else "length"


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


async def events(srv, job):
    """The server-sent events of a streamed answer. Generation runs in a worker thread and hands text over a
    queue; when the client disconnects this generator is closed, and `finally` stops the generation."""
    choice, envelope, usage = shapes(srv.name, job.chat, len(job.prompt_ids), True)
    pieces, cancel, loop = queue.Queue(), threading.Event(), asyncio.get_running_loop()
    sink = types.SimpleNamespace(write=lambda text: pieces.put(text) if text else None, flush=lambda: None)

    def work():
        try:
            pieces.put(("end",) + answer(srv, job, sink, cancel))
        except Exception as e:  # noqa: BLE001 - reported to the client as the stream's last event
            pieces.put(("failed", f"{type(e).__name__}: {e}"))
    worker = loop.run_in_executor(None, work)
    try:
        if job.chat:
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


async def respond(srv, job):
    if job.stream:
        return StreamingResponse(events(srv, job), media_type="text/event-stream")
    choice, envelope, usage = shapes(srv.name, job.chat, len(job.prompt_ids), False)
    # in a worker thread: the server keeps answering (health, queued requests) meanwhile
    text, n, finish = await asyncio.get_running_loop().run_in_executor(None, answer, srv, job)
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
        return await respond(srv, read_job(body, srv, GENERATE.chat_ids(srv.tokenizer, messages_of(body)), chat=True))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, srv.name)
        return await respond(srv, read_job(body, srv, srv.tokenizer(prompt_of(body))["input_ids"], chat=False))
    return app


def serve(cfg):
    """Load the model and serve it until Ctrl-C, on --host:--port, with --api-key (or $LLM_MINI_API_KEY)."""
    model, tokenizer = GENERATE.load(cfg.model)
    g, name = cfg.infer, cfg.model.name
    api_key = g.api_key or os.environ.get("LLM_MINI_API_KEY")
    if not tokenizer.chat_template:
        log("note: the tokenizer has no chat template: /v1/chat/completions answers 400, /v1/completions works")
    log(f"serving {name} at http://{g.host}:{g.port}/v1 ({'API key required' if api_key else 'no API key'}); "
        "Ctrl-C to stop")
    srv = Served(model, tokenizer, name, GENERATE.context_of(model))
    uvicorn.run(make_app(srv, api_key), host=g.host, port=g.port, log_level="warning")
