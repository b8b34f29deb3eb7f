"""A picture of the chat page (INFER.py --serve, at /) in a real conversation, taken by headless Chromium as the
tests drive it: the model served on a free loopback port, the questions typed and sent with Enter, greedy.

    python bench/chat_screenshot.py --model path/to/SmolLM2-135M-Instruct --out docs/chat.png

Needs selenium and Debian's chromium + chromium-driver (make test installs them), fastapi and uvicorn.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is the capital of France?", "Write a Python function that adds two numbers."]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="docs/chat.png")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--size", default="900,760", help="window width,height in pixels")
    a = p.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "INFER.py", "--model", a.model, "--serve", "--port", str(port)], cwd=ROOT)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={a.size}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):  # the model loads first
            try:
                urllib.request.urlopen(url + "health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        driver.get(url)
        wait = WebDriverWait(driver, 600)
        wait.until(lambda d: d.find_element(By.ID, "model").text != "connecting…")
        driver.find_element(By.ID, "settings-button").click()
        for name, value in (("temperature", "0"), ("max_tokens", str(a.max_tokens))):
            driver.find_element(By.ID, name).clear()
            driver.find_element(By.ID, name).send_keys(value)
        driver.find_element(By.ID, "settings-button").click()
        for question in QUESTIONS:
            driver.find_element(By.ID, "input").send_keys(question, Keys.ENTER)
            time.sleep(0.5)
            wait.until(lambda d: d.find_element(By.ID, "send").is_displayed())
        driver.save_screenshot(a.out)
        print(f"wrote {a.out}: " + " | ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "#log .msg")))
    finally:
        driver.quit()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
