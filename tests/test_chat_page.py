"""The chat page at / of INFER.py --serve, driven in a real headless Chromium (Debian's chromium and
chromium-driver, through selenium) against real servers of tiny models."""
import json
import shutil
import threading
import time
import urllib.request

import pytest

from conftest import run, serving, train

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser"))):
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "page-key"
CHAT_MODEL = ["--data", "data/chat.jsonl", "tests/data/train.txt", "--max-length", "128", "--config-overrides",
              "{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 16384}"]  # long answers last: 16,000 tokens take half a minute
HTML = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "chat"
    train(out, *CHAT_MODEL)
    return out


@pytest.fixture(scope="module")
def server(chat_model):
    """The chat model served one request at a time with room for one waiting: (url, the server's log file)."""
    log = chat_model.parent / "server.log"
    with serving(chat_model, "--batch-size", "1", "--max-waiting", "1", log=log) as url:
        yield url, log


@pytest.fixture(scope="module")
def html_server(chat_model):
    """The same weights behind an API key, with a tokenizer whose decoder writes every character of an answer as
    HTML (a tokenizers Replace decoder): the model's replies are markup and script."""
    html_model = chat_model.parent / "html"
    shutil.copytree(chat_model, html_model, ignore=shutil.ignore_patterns("ckpt-*"))
    tokenizer = json.load(open(html_model / "tokenizer.json"))
    tokenizer["decoder"] = {"type": "Sequence", "decoders": [tokenizer["decoder"], {
        "type": "Replace", "pattern": {"Regex": "[\\s\\S]"}, "content": HTML}]}
    json.dump(tokenizer, open(html_model / "tokenizer.json", "w"))
    with serving(html_model, "--api-key", KEY) as url:
        yield url


def browser(width=1000, height=800):
    """A fresh headless Chromium (its own empty profile: no storage from another test) that logs its network;
    below 500 pixels wide (Chromium's narrowest window), a phone's screen, emulated."""
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    if width < 500:
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": width, "height": height,
                                                                              "pixelRatio": 3}})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.fixture
def page():
    driver = browser()
    yield driver
    driver.quit()


def wait(driver, condition, seconds=60):
    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition())


def opened(driver, url):
    """The page loaded and connected: the model's name in its header."""
    driver.get(url + "/")
    wait(driver, lambda: driver.find_element(By.ID, "model").text != "connecting…")
    return driver


def set_settings(driver, **values):
    if not driver.find_element(By.ID, "settings").is_displayed():
        driver.find_element(By.ID, "settings-button").click()
    for name, value in values.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))


def ask(driver, *keys):
    """Type into the message box and press Enter; -> the text of the answer shown, once it is complete."""
    before = len(driver.find_elements(By.CSS_SELECTOR, "#log .msg"))
    driver.find_element(By.ID, "input").send_keys(*keys, Keys.ENTER)
    wait(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#log .msg")) > before
         and driver.find_element(By.ID, "send").is_displayed())
    return texts(driver)[-1]


def texts(driver):
    """[(kind, text)] of the conversation shown: user, assistant, completion or error."""
    return [tuple(pair) for pair in driver.execute_script(  # at one moment: a streaming answer changes under us
        "return [...document.querySelectorAll('#log .msg')].map("
        "(e) => [e.classList[1], e.querySelector('.text').textContent])")]


def test_a_greedy_answer_on_the_page_is_infer_chat_greedys(server, chat_model, page):
    opened(page, server[0])
    models = json.load(urllib.request.urlopen(server[0] + "/v1/models"))
    assert page.find_element(By.ID, "model").text == models["data"][0]["id"]
    set_settings(page, system="Be brief.", temperature=0, max_tokens=24)
    kind, shown = ask(page, "What is LLM-MINI?")
    r = run("INFER.py", "--model", chat_model, "--chat", "--greedy", "--system", "Be brief.", "--prompt",
            "What is LLM-MINI?", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert (kind, shown) == ("assistant", r.stdout[:-1]) and shown  # INFER.py ends the answer with a newline


def test_stop_ends_a_long_answer_the_server_stops_and_the_newest_text_stays_in_view(server):
    """On a phone-sized window: a 16,000-token answer, followed as it streams; Stop ends it at once, and the
    server, serving one request at a time, answers the next question."""
    driver = browser(390, 700)
    try:
        opened(driver, server[0])
        set_settings(driver, temperature=0, max_tokens=16000)
        driver.find_element(By.ID, "settings-button").click()  # closed again: more room for the conversation
        driver.find_element(By.ID, "input").send_keys("Tell me a long story.", Keys.ENTER)
        log = driver.find_element(By.ID, "log")
        wait(driver, lambda: driver.execute_script("return arguments[0].scrollHeight > 2 * arguments[0].clientHeight",
                                                   log))
        assert driver.execute_script("const l = arguments[0]; return l.scrollHeight - l.scrollTop - l.clientHeight < 80",
                                     log)
        driver.find_element(By.ID, "stop").click()
        wait(driver, lambda: driver.find_element(By.ID, "send").is_displayed())
        assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant .note").text == "stopped"
        wait(driver, lambda: "client went away" in server[1].read_text(), 30)
        line = next(line for line in server[1].read_text().splitlines() if "client went away" in line)
        assert int(line.split("after ")[1].split()[0]) < 16000, line
        set_settings(driver, max_tokens=8)
        assert ask(driver, "And now?")[0] == "assistant"
    finally:
        driver.quit()


def test_a_reload_keeps_the_conversation_and_the_settings_and_new_chat_clears_it(server, page):
    opened(page, server[0])
    set_settings(page, system="Answer in French.", temperature=0, top_p=0.5, max_tokens=6)
    ask(page, "Hello")
    ask(page, "Again")
    before = texts(page)
    opened(page, server[0])
    assert texts(page) == before and len(before) == 4
    assert [page.find_element(By.ID, name).get_attribute("value") for name in ("system", "temperature", "top_p",
                                                                               "max_tokens")] == [
        "Answer in French.", "0", "0.5", "6"]
    page.find_element(By.ID, "new").click()
    assert texts(page) == []
    opened(page, server[0])
    assert texts(page) == []


def test_code_keeps_its_spacing_and_shift_enter_is_a_new_line(server, page):
    opened(page, server[0])
    set_settings(page, max_tokens=4)
    line = (Keys.SHIFT, Keys.ENTER, Keys.SHIFT)  # Shift+Enter: a new line in the message, not sent
    ask(page, "Look:", *line, "```python", *line, "def f():", *line, "    return  1", *line, "```")
    code = page.find_element(By.CSS_SELECTOR, ".msg.user pre code")
    assert code.get_attribute("textContent") == "def f():\n    return  1"
    style = page.execute_script("const s = getComputedStyle(arguments[0]); return [s.whiteSpace, s.fontFamily]",
                                code.find_element(By.XPATH, ".."))
    assert style[0] == "pre-wrap" and "monospace" in style[1]


def test_html_from_the_user_or_the_model_is_shown_as_text_and_runs_nothing(html_server, page):
    page.get(html_server + "/")
    wait(page, lambda: page.find_element(By.ID, "key").is_displayed())
    page.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    wait(page, lambda: page.find_element(By.ID, "input").is_displayed())
    set_settings(page, temperature=0, max_tokens=3)
    mine = '<img src=x onerror="window.pwned=3"><script>window.pwned=4</script><b>bold?</b>'
    ask(page, mine)
    (_, user), (_, reply) = texts(page)
    assert user == mine and reply == HTML * len(reply.split(HTML)[:-1]) and HTML in reply
    assert page.find_elements(By.CSS_SELECTOR, "#log img, #log script, #log b") == []
    assert page.execute_script("return window.pwned") is None


def test_the_page_reaches_no_other_origin_and_its_policy_forbids_inline_handlers(server, page):
    opened(page, server[0])
    set_settings(page, max_tokens=4)
    ask(page, "Hi")
    page.execute_script("""window.violations = [];
        document.addEventListener('securitypolicyviolation', (e) => window.violations.push(e.violatedDirective));
        document.body.insertAdjacentHTML('beforeend', '<img src=x onerror="window.pwned=1">');
        fetch('http://127.0.0.2:9/').catch(() => {});""")
    wait(page, lambda: len(page.execute_script("return window.violations")) >= 2, 10)
    assert page.execute_script("return window.pwned") is None
    assert {v.split()[0] for v in page.execute_script("return window.violations")} >= {"script-src-attr", "connect-src"}
    sent = [json.loads(e["message"])["message"]["params"]["request"]["url"] for e in page.get_log("performance")
            if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"]
    assert sent and all(u.startswith(server[0] + "/") or u.startswith("data:") for u in sent), sent


def test_with_an_api_key_a_wrong_key_shows_the_servers_error_and_the_right_one_works(html_server, page):
    page.get(html_server + "/")
    wait(page, lambda: page.find_element(By.ID, "key").is_displayed())
    page.find_element(By.ID, "key").send_keys("wrong", Keys.ENTER)
    wait(page, lambda: "a valid API key is required" in page.find_element(By.ID, "key-error").text)
    assert page.find_element(By.ID, "key-error").text.startswith("401: ")
    page.find_element(By.ID, "key").clear()
    page.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    wait(page, lambda: page.find_element(By.ID, "model").text.endswith("html"))
    set_settings(page, max_tokens=2)
    assert ask(page, "Hi")[0] == "assistant"


def test_server_errors_appear_in_the_conversation(server, page):
    """A request longer than the context (400), and one that finds the queue full (503)."""
    opened(page, server[0])
    set_settings(page, max_tokens=20000)
    kind, text = ask(page, "Hi")
    assert kind == "error" and text.startswith("400: ") and "context is 16384 tokens" in text
    held = []  # two long answers: one generating, one waiting; the server takes no third

    def hold():
        body = json.dumps({"prompt": "Once", "max_tokens": 16000, "temperature": 0, "stream": True}).encode()
        held.append(urllib.request.urlopen(urllib.request.Request(
            server[0] + "/v1/completions", body, {"Content-Type": "application/json"}), timeout=60))
    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    set_settings(page, max_tokens=10)
    kind, text = ask(page, "Are you there?")
    for t in threads:
        t.join()
    for response in held:
        response.close()
    assert kind == "error" and text.startswith("503: ") and "busy" in text
    assert [k for k, _ in texts(page)] == ["user", "error", "user", "error"]


def test_a_model_without_a_chat_template_gets_a_completion_view(tmp_path):
    out = tmp_path / "plain"
    train(out)  # stories, no conversations: no chat template
    driver = browser()
    try:
        with serving(out) as url:
            opened(driver, url)
            assert "completion" in driver.find_element(By.ID, "mode").text
            set_settings(driver, temperature=0, max_tokens=12)
            kind, shown = ask(driver, "Once upon a time")
        r = run("INFER.py", "--model", out, "--greedy", "--prompt", "Once upon a time", "--max-new-tokens", "12")
        assert (kind, shown) == ("completion", "Once upon a time" + r.stdout[:-1])
    finally:
        driver.quit()


@pytest.mark.parametrize("width, height", [(390, 844), (1280, 800)])
def test_readable_on_a_phone_and_a_desktop(server, width, height):
    """Nothing wider than the window (a long word wraps), the message box and its button on screen."""
    driver = browser(width, height)
    try:
        opened(driver, server[0])
        set_settings(driver, max_tokens=4)
        ask(driver, "x" * 300)
        shown_width, shown_height = driver.execute_script("return [innerWidth, innerHeight]")
        assert shown_width == width or width >= 500  # a desktop window loses a little to the browser's own frame
        assert driver.execute_script("return document.documentElement.scrollWidth") <= shown_width
        assert driver.execute_script("const l = document.getElementById('log'); return l.scrollWidth <= l.clientWidth")
        for name in ("input", "send", "new"):
            box = driver.find_element(By.ID, name).rect
            assert 0 <= box["x"] and box["x"] + box["width"] <= shown_width, name
            assert 0 <= box["y"] and box["y"] + box["height"] <= shown_height, name
    finally:
        driver.quit()
