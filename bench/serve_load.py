"""A load check of INFER.py --serve: N concurrent clients for a fixed time, against the server in each mode.

    pip install fastapi uvicorn
    python bench/serve_load.py --model out [--clients 1,4,8,16] [--batch-sizes 1,8] [--seconds 20] [--stream]
                               [--dtype float32|bfloat16|int8] [--decode auto|compiled|eager]

Each client sends chat completions back to back (greedy, max_tokens fixed, a different question each
time) and checks every answer is complete (valid JSON, an assistant message, a finish_reason; streamed:
ends with [DONE]). One server per --batch-size (1: one request at a time, the baseline; 8: up to 8
requests generate together), measured in the same run. Printed per client count: requests/s, completion
tokens/s, p50/p95 latency, failures, and the requests/s against the baseline with as many clients.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is LLM-MINI?", "How do I resume a run?", "Which file trains the model?", "What is LoRA?",
             "How do I serve a model?", "What does packing do?", "Tell me a story.", "Why use safetensors?"]


def ask(url, i, max_tokens, stream):
    body = json.dumps({"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "temperature": 0,
                       "max_tokens": max_tokens, "stream": stream}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        raw = r.read().decode()
    if stream:
        events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
        last = json.loads(events[-2])
        return events[-1] == "[DONE]" and last["choices"][0]["finish_reason"] is not None, last["usage"]["completion_tokens"]
    out = json.loads(raw)
    choice = out["choices"][0]
    return choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length"), \
        out["usage"]["completion_tokens"]


def load(url, clients, seconds, max_tokens, stream):
    results, end = [], time.perf_counter() + seconds

    def client(k):
        i = k
        while time.perf_counter() < end:
            t = time.perf_counter()
            try:
                ok, n = ask(url, i, max_tokens, stream)
            except Exception:  # noqa: BLE001 - counted as a failure
                ok, n = False, 0
            results.append((time.perf_counter() - t, ok, n))
            i += clients
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    return (len(results) / wall, sum(r[2] for r in results) / wall, statistics.median(lat),
            lat[min(len(lat) - 1, int(0.95 * len(lat)))], sum(not r[1] for r in results), len(results))


def start(model, batch_size, dtype, decode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "INFER.py", "--model", model, "--serve", "--port", str(port),
                               "--batch-size", str(batch_size), "--max-waiting", "1000", "--dtype", dtype, "--decode", decode],
                              cwd=ROOT,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1500):  # 5 minutes: the compiled step compiles first
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return server, url
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--dtype", default="auto", help="the server's --dtype (float32, bfloat16, int8)")
    ap.add_argument("--decode", default="auto", help="the server's --decode (auto: compiled for one request at a time)")
    args = ap.parse_args()
    cpu = next((ln.split(":")[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores; {args.model} (--dtype {args.dtype}, --decode {args.decode}); greedy chat completions of max {args.max_tokens} tokens"
          f"{', streamed' if args.stream else ''}; {args.seconds:g} s per row")
    print(f"{'batch':>5} {'clients':>7} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'failed':>10} {'vs batch 1':>10}")
    baseline = {}
    for batch in map(int, args.batch_sizes.split(",")):
        server, url = start(args.model, batch, args.dtype, args.decode)
        try:
            ask(url, 0, args.max_tokens, args.stream)  # warm-up
            for n in map(int, args.clients.split(",")):
                rps, tps, p50, p95, failed, total = load(url, n, args.seconds, args.max_tokens, args.stream)
                baseline.setdefault(n, rps) if batch == 1 else None
                ratio = f"{rps / baseline[n]:.2f}x" if n in baseline else ""
                print(f"{batch:5d} {n:7d} {rps:7.2f} {tps:7.1f} {p50:7.3f} {p95:7.3f} {failed:>5}/{total:<4} {ratio:>10}",
                      flush=True)
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
