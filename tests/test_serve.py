"""INFER.py --serve: the OpenAI-compatible API, driven by the official openai client against a real server."""
import http.client
import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import run, serving, train

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
KEY = "test-key"
SYSTEM, QUESTION = "Be brief.", "What is LLM-MINI?"


CHAT_MODEL = ["--data", "data/chat.jsonl", "tests/data/train.txt", "--max-length", "128", "--config-overrides",
              "{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 1024}"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny chat model (ChatML, a context of 1024) served on a free loopback port with an API key:
    (model dir, base url, the server's log file)."""
    out = tmp_path_factory.mktemp("serve") / "out"
    train(out, *CHAT_MODEL)
    with serving(out, "--api-key", KEY, log=out.parent / "server.log") as url:
        yield out, url, out.parent / "server.log"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0)


def model_id(server):
    return str(server[0])


def test_models_lists_the_served_model_and_health_needs_no_key(server, client):
    assert [m.id for m in client.models.list().data] == [model_id(server)]
    assert json.load(urllib.request.urlopen(server[1] + "/health")) == {"status": "ok"}


def test_greedy_chat_completion_is_infer_chat_greedy_token_for_token(server, client):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    got = client.chat.completions.create(model=model_id(server), messages=messages, temperature=0, max_tokens=24)
    r = run("INFER.py", "--model", server[0], "--chat", "--greedy", "--system", SYSTEM, "--prompt", QUESTION,
            "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert got.choices[0].message.content == r.stdout[:-1]  # INFER.py ends the answer with a newline
    assert got.choices[0].message.role == "assistant" and got.usage.completion_tokens <= 24


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streaming_gives_the_same_text_as_not_streaming(server, client, kind):
    if kind == "chat":
        ask = dict(model=model_id(server), messages=[{"role": "user", "content": QUESTION}], temperature=0,
                   max_tokens=30)
        whole = client.chat.completions.create(**ask)
        chunks = list(client.chat.completions.create(**ask, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        text = whole.choices[0].message.content
    else:
        ask = dict(model=model_id(server), prompt="Once upon a time", temperature=0, max_tokens=30)
        whole = client.completions.create(**ask)
        chunks = list(client.completions.create(**ask, stream=True))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        text = whole.choices[0].text
    assert streamed == text and text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_stop_string_ends_the_text_before_it(server, client):
    ask = dict(model=model_id(server), prompt="Once upon a time", temperature=0, max_tokens=40)
    free = client.completions.create(**ask).choices[0].text
    stop = next(free[i:i + 3] for i in range(4, len(free) - 3) if free[i:i + 3].strip())  # text from its middle
    stopped = client.completions.create(**ask, stop=[stop]).choices[0]
    assert stopped.text == free[:free.index(stop)] and stopped.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stop=stop, stream=True) if c.choices)
    assert streamed == stopped.text


@pytest.mark.parametrize("ask, status, words", [
    (dict(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]), 404, "not served here"),
    (dict(messages=[]), 400, "'messages' must be a non-empty list"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0]"),
    (dict(messages=[{"role": "user", "content": "hi"}], temperature="hot"), 400, "'temperature' must be a number"),
    (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=5000), 400, "context is 1024 tokens"),
])
def test_bad_requests_get_a_4xx_with_a_message(server, client, ask, status, words):
    ask.setdefault("model", model_id(server))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**ask)
    assert e.value.status_code == status and words in e.value.body["message"], e.value.body


def test_a_body_that_is_not_json_is_a_400_not_a_500(server):
    request = urllib.request.Request(server[1] + "/v1/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400 and "must be JSON" in json.load(e.value)["error"]["message"]


def test_the_api_key_is_enforced(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server[1] + "/v1", api_key=key or "none", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_a_client_that_disconnects_mid_stream_stops_generation(server, client):
    stream = client.completions.create(model=model_id(server), prompt="Once upon a time", temperature=0,
                                       max_tokens=1000, stream=True)
    next(iter(stream))
    stream.close()
    for _ in range(100):
        if "client went away" in server[2].read_text():
            break
        time.sleep(0.1)
    line = next(line for line in server[2].read_text().splitlines() if "client went away" in line)
    assert int(line.split("after ")[1].split()[0]) < 50, line  # at once, not at EOS or the 1000th token


def stopped_after(log):
    """How many tokens each stopped answer had, from the server log's 'client went away' lines."""
    lines = [line for line in log.read_text().splitlines() if "client went away" in line]
    return [int(line.split("after ")[1].split()[0]) for line in lines]


def test_a_client_that_leaves_before_its_answer_stops_generation(server):
    """Not streamed: nothing is sent until the answer is done, yet the server sees the connection close."""
    before = len(stopped_after(server[2]))
    ask = {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0}
    request = urllib.request.Request(server[1] + "/v1/completions", json.dumps(ask).encode(),
                                     headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(OSError):  # urllib gives up after 0.3 s and closes the connection
        urllib.request.urlopen(request, timeout=0.3)
    for _ in range(100):
        if len(stopped_after(server[2])) > before:
            break
        time.sleep(0.1)
    assert stopped_after(server[2])[before:] and stopped_after(server[2])[before] < 1000, server[2].read_text()


def test_streamed_clients_that_leave_while_waiting_leave_the_server_free(server, tmp_path):
    """40 streamed clients (more than any thread pool of Python's holds) wait behind 8 long answers of one
    request, one at a time; all leave. The next client's answer then streams at once."""
    with serving(server[0], "--api-key", KEY, "--batch-size", "1", "--max-waiting", "64", log=tmp_path / "log") as url:
        host = urllib.parse.urlsplit(url).netloc
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        long = http.client.HTTPConnection(host, timeout=30)
        long.request("POST", "/v1/completions", json.dumps({"prompt": ["Once upon a time"] * 8, "max_tokens": 900}),
                     headers)
        waiting = [http.client.HTTPConnection(host, timeout=30) for _ in range(40)]
        for c in waiting:
            c.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 50, "stream": True}), headers)
            assert c.getresponse().status == 200  # queued: the stream has begun
        for c in [long, *waiting]:
            c.close()
        start = time.monotonic()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        text = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=str(server[0]), prompt="Hello", max_tokens=4, stream=True))
        assert text and time.monotonic() - start < 10


def test_an_error_inside_generation_is_an_openai_error_and_one_log_line(server, tmp_path):
    """A broken model folder: its tokenizer has one token more than the model's embedding, so a prompt holding
    that token fails inside generate. The client gets an OpenAI-shaped error (a 500; a stream's last event),
    the log one line each and no traceback, and the server answers the next request."""
    broken = tmp_path / "broken"
    shutil.copytree(server[0], broken, ignore=shutil.ignore_patterns("ckpt-*"))
    tokenizer = json.load(open(broken / "tokenizer.json"))
    flags = dict.fromkeys(["single_word", "lstrip", "rstrip", "normalized", "special"], False)
    tokenizer["added_tokens"].append({"id": json.load(open(broken / "config.json"))["vocab_size"], "content": "<|x|>",
                                      **flags})
    json.dump(tokenizer, open(broken / "tokenizer.json", "w"))
    with serving(broken, "--api-key", KEY, log=tmp_path / "log") as url:
        status, answer, _ = post((broken, url), "/v1/completions", {"prompt": "a <|x|>", "max_tokens": 4})
        assert status == 500 and answer["error"]["type"] == "server_error"
        assert "IndexError" in answer["error"]["message"]
        ask = {"prompt": "a <|x|>", "max_tokens": 4, "stream": True}
        request = urllib.request.Request(url + "/v1/completions", json.dumps(ask).encode(),
                                         headers={"Authorization": f"Bearer {KEY}"})
        events = urllib.request.urlopen(request, timeout=60).read().decode().split("\n\n")
        assert "IndexError" in json.loads(events[-3].removeprefix("data: "))["error"]["message"]
        assert events[-2] == "data: [DONE]"
        assert post((broken, url), "/v1/completions", {"prompt": "a", "max_tokens": 4})[0] == 200
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and [line.split(":")[0] for line in log.splitlines()[1:]] == ["error", "error",
                                                                                            "stopped"], log


def test_serving_without_the_packages_names_what_to_install(tmp_path):
    # a Python path whose fastapi cannot be imported stands for an environment without the serving extras
    (tmp_path / "fastapi.py").write_text("raise ImportError('no fastapi here')\n")
    r = run("INFER.py", "--model", "gpt2", "--serve", env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "needs the fastapi and uvicorn packages - pip install fastapi uvicorn" in r.stderr


def post(server, path, body):
    """(status, JSON body, headers) of a POST with the API key."""
    request = urllib.request.Request(server[1] + path, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.load(r), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.load(e), {k.lower(): v for k, v in e.headers.items()}


def post_raw(server, path, data):
    request = urllib.request.Request(server[1] + path, data=data,
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.parametrize("path, body, words", [
    ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}, "'prompt' holds a lone UTF-16 surrogate"),
    ("/v1/completions", {"prompt": ["ok", "\udfff"], "max_tokens": 2}, "'prompt[1]' holds a lone"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "'messages[0].content' holds"),
    ("/v1/completions", {"prompt": "x", "stop": ["\ud800"], "max_tokens": 2}, "'stop[0]' holds a lone"),
    ("/tokenize", {"prompt": "\ud800"}, "'prompt' holds a lone"),
    ("/v1/completions", {"prompt": "x", "stream": "yes", "max_tokens": 2}, "'stream' must be true or false, not \"yes\""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": 1}, "'stream' must be true or"),
    ("/v1/completions", {"prompt": "x", "echo": "true", "max_tokens": 2}, "'echo' must be true or false"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, "'logprobs' must be"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "'add_special_tokens' must be true or false"),
    ("/detokenize", {"tokens": [True]}, "'tokens' must be a list of token ids"),
    ("/v1/completions", "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("/v1/completions", "", "must be JSON"),
])
def test_no_request_body_gets_a_5xx_nor_a_silent_reading(server, path, body, words):
    """Bodies that are valid JSON but no valid request: lone surrogates (no text can hold one), a string or a
    number where true/false belongs, nesting deeper than Python's parser: a 400 naming what is wrong."""
    status, answer = post_raw(server, path, (body if isinstance(body, str) else json.dumps(body)).encode())
    assert status == 400 and words in answer["error"]["message"], answer


def test_greedy_answers_generated_together_equal_those_generated_alone(server, tmp_path):
    """Prompts of different lengths sent at once (batched generate calls, left-padded) get the answers each gets
    alone, token for token; the server's log, as it stops, says batches were generated together."""
    from concurrent.futures import ThreadPoolExecutor
    asks = [{"prompt": p, "max_tokens": 16, "temperature": 0} for p in
            ("Once", "Once upon a time there was", "The fox liked to watch the river shine in the", "A")]
    log = tmp_path / "server.log"
    with serving(server[0], "--api-key", KEY, "--batch-size", "4", log=log) as url:
        alone = [post((None, url), "/v1/completions", ask)[1]["choices"][0]["text"] for ask in asks]
        with ThreadPoolExecutor(len(asks)) as pool:
            together = [list(pool.map(lambda ask: post((None, url), "/v1/completions", ask), asks))
                        for _ in range(3)]
    assert all([r[1]["choices"][0]["text"] for r in answers] == alone for answers in together)
    assert len(set(alone)) > 1
    assert re.search(r"stopped: 16 answers generated in \d+ batches, at most [234] together", log.read_text())


def test_ctrl_c_stops_a_server_that_has_just_answered(server, tmp_path):
    """Ctrl-C may be taken by any thread of the process, and Python raises it on the main thread only once that
    thread runs: the idle worker wakes to let it, and the server stops each time and says so (serving() fails a
    server that does not stop)."""
    for attempt in range(4):
        log = tmp_path / f"server{attempt}.log"
        with serving(server[0], "--api-key", KEY, log=log) as url:
            assert post((None, url), "/v1/completions", {"prompt": "Once", "max_tokens": 8})[0] == 200
        assert log.read_text().splitlines()[-1] == "stopped: 1 answers generated in 1 batches, at most 1 together"


def test_echoed_prompt_logprobs_are_eval_pys(server, tmp_path):
    """lm-evaluation-harness's loglikelihood request: token-id prompts, echo, logprobs, one new token."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(server[0])
    texts = ["Once upon a time there was a fox", "The river was quiet"]
    ids = [tok(t)["input_ids"] for t in texts]
    status, body, _ = post(server, "/v1/completions", {"model": model_id(server), "prompt": ids, "max_tokens": 1,
                                                       "echo": True, "logprobs": 2, "temperature": 0})
    assert status == 200, body
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    r = run("EVAL.py", "--model", server[0], "--data", tmp_path / "t.txt", "--dump", tmp_path / "d.jsonl")
    assert r.returncode == 0, r.stderr
    dumped = [json.loads(line) for line in open(tmp_path / "d.jsonl")]
    for choice, prompt, ref in zip(sorted(body["choices"], key=lambda c: c["index"]), ids, dumped):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert ref["tokens"][:len(prompt) - 1] == prompt[1:]  # EVAL scores every token but the first, then EOS
        for got, want in zip(lp["token_logprobs"][1:len(prompt)], ref["logprobs"]):
            assert got == pytest.approx(want, abs=1e-5)
        assert all(len(top) <= 2 and max(top.values()) >= lp["token_logprobs"][k] - 1e-6
                   for k, top in enumerate(lp["top_logprobs"][1:], 1))
        assert choice["text"].startswith(tok.decode(prompt)) and lp["text_offset"][0] == 0


def test_max_tokens_0_with_echo_scores_the_prompt_only(server):
    status, body, _ = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 0, "echo": True,
                                                       "logprobs": 0})
    assert status == 200, body
    assert body["choices"][0]["text"] == "Once upon a time" and body["usage"]["completion_tokens"] == 0
    assert len(body["choices"][0]["logprobs"]["tokens"]) == body["usage"]["prompt_tokens"]
    status, body, _ = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 0})
    assert status == 400 and "needs 'echo'" in body["error"]["message"]


@pytest.mark.parametrize("path, extra, words", [
    ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, "'presence_penalty' is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": []}, "'tools' is not supported"),
    ("/v1/completions", {"prompt": [[1, 2], "text", 3]}, "'prompt' must be"),
    ("/v1/completions", {"prompt": [[10 ** 9]]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "'logprobs' must be an integer from 0 to 20"),
    ("/v1/completions", {"prompt": "a", "logprobs": 1, "stream": True}, "not streamed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "content parts of type 'image_url' are not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "needs 'logprobs'"),
])
def test_a_parameter_the_server_does_not_honour_is_refused_by_name(server, path, extra, words):
    status, body, _ = post(server, path, extra)
    assert status == 400 and words in body["error"]["message"], body


def test_chat_logprobs_and_text_parts(server, client):
    plain = client.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    parts = [{"type": "text", "text": QUESTION[:7]}, {"type": "text", "text": QUESTION[7:]}]
    split = client.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": parts}],
                                           temperature=0, max_tokens=12)
    assert split.choices[0].message.content == plain.choices[0].message.content
    content = plain.choices[0].logprobs.content
    assert content and "".join(c.token for c in content).startswith(plain.choices[0].message.content)
    assert all(len(c.top_logprobs) == 3 and c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5)
               for c in content)  # greedy: each token is its position's most likely


def test_the_tokenizer_endpoints_round_trip(server):
    info = json.load(urllib.request.urlopen(urllib.request.Request(server[1] + "/tokenizer_info",
                                                                   headers={"Authorization": f"Bearer {KEY}"})))
    assert info["eos_token"] == "<|endoftext|>" and "<|im_start|>" in info["chat_template"]
    status, ids, _ = post(server, "/tokenize", {"prompt": "Once upon a time", "add_special_tokens": False})
    assert status == 200 and ids["count"] == len(ids["tokens"]) > 0
    assert post(server, "/detokenize", {"tokens": ids["tokens"]})[1] == {"prompt": "Once upon a time"}


@pytest.fixture(scope="module")
def busy_server(server):
    """The same model served one request at a time, with room for one waiting request."""
    with serving(server[0], "--api-key", KEY, "--batch-size", "1", "--max-waiting", "1") as url:
        yield server[0], url


def test_a_full_queue_is_a_503_with_retry_after_and_the_rest_are_answered(busy_server):
    from concurrent.futures import ThreadPoolExecutor
    ask = {"prompt": "Once upon a time", "max_tokens": 900, "temperature": 0}
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(post, busy_server, "/v1/completions", ask)
        time.sleep(0.2)  # the first is generating, out of the queue: one more may wait, the other four may not
        results = [*pool.map(lambda _: post(busy_server, "/v1/completions", ask), range(5)), first.result()]
    busy = [r for r in results if r[0] == 503]
    assert busy and all(r[2].get("retry-after") == "1" and "busy" in r[1]["error"]["message"] for r in busy)
    answered = [r for r in results if r[0] == 200]
    assert len(answered) == 2 and len(busy) == 4 and len({r[1]["choices"][0]["text"] for r in answered}) == 1
