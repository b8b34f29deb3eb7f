"""INFER.py --serve: the OpenAI-compatible API, driven by the official openai client against a real server."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, run, train

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
KEY = "test-key"
SYSTEM, QUESTION = "Be brief.", "What is LLM-MINI?"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny chat model (ChatML, a context of 1024) served on a free loopback port with an API key:
    (model dir, base url, the server's log file)."""
    out = tmp_path_factory.mktemp("serve") / "out"
    train(out, "--data", "data/chat.jsonl", "tests/data/train.txt", "--max-length", "128", "--config-overrides",
          "{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 1024}")
    port, logfile = free_port(), out.parent / "server.log"
    proc = subprocess.Popen([sys.executable, "INFER.py", "--model", str(out), "--serve", "--port", str(port),
                             "--api-key", KEY], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(logfile, "w"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, logfile.read_text()
            time.sleep(0.25)
    yield out, url, logfile
    proc.terminate()
    proc.wait(30)


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


def test_serving_without_the_packages_names_what_to_install(tmp_path):
    # a Python path whose fastapi cannot be imported stands for an environment without the serving extras
    (tmp_path / "fastapi.py").write_text("raise ImportError('no fastapi here')\n")
    r = run("INFER.py", "--model", "gpt2", "--serve", env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert r.returncode != 0 and "pip install fastapi uvicorn" in r.stderr and "Traceback" not in r.stderr
