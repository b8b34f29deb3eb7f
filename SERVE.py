"""An OpenAI-compatible HTTP API for a model, on FastAPI + uvicorn: `python INFER.py --model out --serve`.

    GET  /                       a chat page for people (chat.html): it uses the API below, as any client does
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
import base64
import dataclasses
import functools
import hashlib
import json
import os
import re
import threading
import time
import types

import uvicorn  # fastapi and uvicorn: optional, checked by INFER.py --serve before it imports this file
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError  # transformers' chat templates are Jinja

import DECODE
import GENERATE
import SCHEDULER
from PROTOCOL import (RequestError, choice, finish_reason, flag, messages_of, no_lone_surrogates, options, prompts_of,
                      shapes, unsupported, wanted_logprobs)
from REPORT import UserError, log


@dataclasses.dataclass
class Served:
    """What every request needs: the model, its tokenizer, its id, its context, the queue, the compiled
    decoding step's config (DECODE.compiled_step) or None, and the model batches generate with
    (GENERATE.for_batches: packed beside a compiled model)."""
    model: object
    tokenizer: object
    name: str
    context: int
    waiting: SCHEDULER.Waiting
    compiled: object
    batches: object


PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


def page_headers(html):
    """The chat page's headers: a Content-Security-Policy that runs only the page's own script and style (by
    their hashes: no inline handler, no injected script) and reaches only this server."""
    def digest(tag):
        inline = re.search(f"<{tag}>(.*?)</{tag}>", html, re.S).group(1)
        return "'sha256-" + base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode() + "'"
    return {"Content-Security-Policy": f"default-src 'none'; script-src {digest('script')}; style-src "
            f"{digest('style')}; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def error(status, message, param=None, code=None, headers=None):
    """An OpenAI-shaped error response."""
    kind = {401: "authentication_error", 404: "not_found_error", 500: "server_error",
            503: "service_unavailable"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def enqueue(srv, jobs):
    if not SCHEDULER.submit(srv.waiting, jobs):
        raise RequestError(503, f"the server is busy: its queue of {srv.waiting.max_waiting} is full - retry shortly",
                           code="server_busy", headers={"Retry-After": "1"})


async def events(srv, job, chat, pieces):
    """The server-sent events of one streamed answer: the worker puts its text on `pieces` (an asyncio.Queue) as
    it comes, then the finished future."""
    envelope, usage = shapes(srv.name, chat, [job], True)
    delta = (lambda text: {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": None}) if chat else \
        (lambda text: {"index": 0, "text": text, "logprobs": None, "finish_reason": None})
    if chat:
        yield f"data: {json.dumps(envelope([{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]))}\n\n"
    while True:
        item = await pieces.get()
        if isinstance(item, str):
            yield f"data: {json.dumps(envelope([delta(item)]))}\n\n"
            continue
        if item.exception():  # the stream has begun (200): the error is its last event, and one log line
            message = f"{type(item.exception()).__name__}: {item.exception()}"
            log(f"error: a streamed answer: {message}")
            last = {"error": {"message": message, "type": "server_error"}}
        else:
            last = envelope([{**delta(""), "finish_reason": finish_reason(job)}], usage=usage())
        yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
        return


class EventStream(StreamingResponse):
    """Server-sent events that call `ended()` however the stream ends: its last event sent, or its client gone.
    When the client goes, Starlette cancels the stream wherever it waits, which can be outside the events
    generator: a `finally` in the generator would run only when the garbage collector gets to it."""

    def __init__(self, events, ended):
        super().__init__(events, media_type="text/event-stream")
        self.ended = ended

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ended()


async def gone(request):
    """Returns when the client disconnects (its body is read: a disconnect is all that can come now)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def respond(srv, request, jobs, texts, chat, stream):
    """Queue the jobs and answer: streamed, or one JSON response when all are done. A client that goes away
    first takes its jobs out of the queue, or stops them at the next token (SCHEDULER.withdraw)."""
    if stream:  # the sink first: the worker may start on the job as soon as it is queued
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        put = functools.partial(loop.call_soon_threadsafe, pieces.put_nowait)  # called on the worker's thread
        jobs[0].row = dataclasses.replace(jobs[0].row, sink=types.SimpleNamespace(write=put, flush=lambda: None))
        jobs[0].future.add_done_callback(put)
        enqueue(srv, jobs)
        return EventStream(events(srv, jobs[0], chat, pieces), lambda: SCHEDULER.withdraw(srv.waiting, jobs))
    enqueue(srv, jobs)
    # The event loop keeps serving (health, other requests) while the worker generates. The jobs' futures are
    # the worker's to set, never cancelled here; `answers` never fails (return_exceptions), so one left unread
    # when its client has gone logs nothing.
    answers = asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs), return_exceptions=True)
    client = asyncio.ensure_future(gone(request))
    try:
        await asyncio.wait([answers, client], return_when=asyncio.FIRST_COMPLETED)
    finally:
        client.cancel()
    if not answers.done():  # the client went away first; no one reads what is sent now
        SCHEDULER.withdraw(srv.waiting, jobs)
        return Response(status_code=499)
    done = answers.result()
    failed = [job for job in done if isinstance(job, Exception)]
    if failed:
        raise failed[0]  # the worker's error: a 500, one line in the log (server_error)
    envelope, usage = shapes(srv.name, chat, jobs, False)
    return JSONResponse(envelope([choice(srv.tokenizer, i, job, text, chat) for i, (job, text) in enumerate(zip(done, texts))],
                                 usage=usage()))


async def json_of(request):
    """The body: a JSON object whose strings are all text (PROTOCOL.no_lone_surrogates)."""
    try:
        body = await request.json()
    except ValueError:
        raise RequestError(400, "the request body must be JSON")
    except RecursionError:  # deeper than Python's JSON parser goes
        raise RequestError(400, "the request body is nested too deeply")
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    no_lone_surrogates(body)
    return body


async def body_of(request, name, kind):
    """A completions request's body, checked: JSON, only parameters this server honours, this model."""
    body = await json_of(request)
    unsupported(body, kind)
    if body.get("model") not in (None, name):
        raise RequestError(404, f"model '{body['model']}' is not served here; this server has '{name}'", "model",
                           "model_not_found")
    return body


def make_app(srv, api_key):
    """The FastAPI application: routes, the API key check and the error handlers."""
    def key(request: Request):  # the page holds nothing secret: it asks for the key itself
        if api_key and request.url.path not in ("/", "/health") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            raise RequestError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")

    app, html = FastAPI(dependencies=[Depends(key)]), open(PAGE, encoding="utf-8").read()
    headers = page_headers(html)

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

    @app.get("/")
    def page():
        return HTMLResponse(html, headers=headers)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": 0, "owned_by": "llm-mini"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request, srv.name, "chat")
        try:
            ids = GENERATE.chat_ids(srv.tokenizer, messages_of(body))
        except TemplateError as e:  # the template's own rule, e.g. roles that must alternate
            raise RequestError(400, f"the model's chat template refuses these messages: {e}", "messages")
        top = wanted_logprobs(body, chat=True)
        opts, seed = options(body, srv.tokenizer, srv.context, len(ids), chat=True)
        jobs = [SCHEDULER.Job(GENERATE.Row(ids, opts), seed, top)]
        return await respond(srv, request, jobs, [""], True, flag(body, "stream"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, srv.name, "completion")
        prompts, top = prompts_of(body, srv.tokenizer), wanted_logprobs(body, chat=False)
        if len(prompts) > 1 and flag(body, "stream"):
            raise RequestError(400, "'stream' takes a single prompt", "stream")
        opts, seed = options(body, srv.tokenizer, srv.context, max(len(ids) for _, ids in prompts), chat=False)
        jobs = [SCHEDULER.Job(GENERATE.Row(ids, opts), seed, top, flag(body, "echo")) for _, ids in prompts]
        return await respond(srv, request, jobs, [text for text, _ in prompts], False, flag(body, "stream"))

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
        special = flag(body, "add_special_tokens") if "add_special_tokens" in body else True
        ids = srv.tokenizer(body["prompt"], add_special_tokens=special)["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": srv.context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        tokens = (await json_of(request)).get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < len(srv.tokenizer) for t in tokens):
            raise RequestError(400, "'tokens' must be a list of token ids", "tokens")
        return {"prompt": srv.tokenizer.decode(tokens)}
    return app


def logged_once(app):
    """The app as uvicorn runs it. Starlette answers an unexpected error with server_error's 500, then raises it
    again for the server to log with its traceback; server_error has logged it in one line, so it ends here."""
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - answered and logged by server_error
            pass
    return asgi


def serve(cfg):
    """Load the model and serve it until Ctrl-C, on --host:--port, with --api-key (or $LLM_MINI_API_KEY)."""
    g, name = cfg.infer, cfg.model.name
    compiled = DECODE.chosen(g.decode, True)
    model, tokenizer = GENERATE.load(cfg.model, compiled)
    api_key = g.api_key or os.environ.get("LLM_MINI_API_KEY")
    if not tokenizer.chat_template:
        log("note: the tokenizer has no chat template: /v1/chat/completions answers 400, /v1/completions works")
    context = GENERATE.context_of(model)
    srv = Served(model, tokenizer, name, context, SCHEDULER.Waiting(g.batch_size, g.max_waiting, context),
                 DECODE.compiled_step(model) if compiled else None,
                 GENERATE.for_batches(model) if compiled and g.batch_size > 1 else model)
    if srv.compiled is not None:  # compiled now, before the first request: it takes 30-100 s (DECODE.py)
        start = time.perf_counter()
        log("compiling the decoding step (--decode eager skips it) ...")
        opts = GENERATE.Options(2, GENERATE.sampling_of(True, 0, 0, 1), *GENERATE.stops_and_eos(tokenizer, [], False))
        GENERATE.generate(model, tokenizer, [GENERATE.Row([0, 0], opts)], srv.compiled)
        log(f"compiled in {time.perf_counter() - start:.0f} s")
    # The HTTP server gets a thread of its own and the model stays on this one, which loaded it: PyTorch's OpenMP
    # threads then form one team, which spins between kernels. A second team (another thread's) makes both sleep
    # between kernels, and the compiled step ran at half speed that way.
    app = logged_once(make_app(srv, api_key))
    http = uvicorn.Server(uvicorn.Config(app, host=g.host, port=g.port, log_level="warning"))
    listener = threading.Thread(target=http.run, daemon=True, name="http")
    listener.start()
    while not http.started:
        if not listener.is_alive():  # uvicorn has logged why (e.g. the port is taken)
            raise UserError(f"--serve: could not listen on {g.host}:{g.port} - pick another --port or --host")
        time.sleep(0.05)
    log(f"serving {name} at http://{g.host}:{g.port}/v1, a chat page at http://{g.host}:{g.port}/ "
        f"({'API key required' if api_key else 'no API key'}; "
        f"up to {g.batch_size} requests generate together, {g.max_waiting} may wait); Ctrl-C to stop")
    try:
        SCHEDULER.work(srv)
    except KeyboardInterrupt:
        w = srv.waiting
        log(f"stopped: {w.taken} answers generated in {w.batches} batches, at most {w.largest} together")
