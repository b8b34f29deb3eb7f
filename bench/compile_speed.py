"""When --compile pays off: TRAIN.py with and without torch.compile, in fresh processes, interleaved.

    python bench/compile_speed.py [--steps 40] [--repeats 2] [--model "{n_layer: 4, n_head: 4, n_embd: 128}"]

A from-scratch GPT-2 (the demo's shape by default) on data/, batch 16 x <= 128 tokens, fp32, CPU, packed
blocks and one sample per document (--no-packing: lengths vary per batch). Figures: the whole process's wall
time (compilation included) and the steady speed (median tokens/s of the log rows after the first, i.e.
after compilation), median over --repeats; baseline: eager, same settings, same run of this script.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out, steps, arch, packing, compile_):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "TRAIN.py", "--from-scratch", "--model", "gpt2", "--config-overrides", arch,
                    "--max-length", "128", "--batch-size", "16", "--max-steps", str(steps), "--log-every", "10",
                    "--save-every", "0", "--out", out, "--overwrite", "--device", "cpu", "--dtype", "float32",
                    "--packing" if packing else "--no-packing", "--compile" if compile_ else "--no-compile"],
                   cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return wall, statistics.median(r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="{n_layer: 4, n_head: 4, n_embd: 128, n_positions: 128}")
    args = ap.parse_args()
    import torch
    work = tempfile.mkdtemp(prefix="llm-mini-compile-bench-")
    cpu = next((line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}; GPT-2 {args.model}, {args.steps} steps, "
          f"median of {args.repeats}")
    print(f"{'data':>11} {'eager s':>8} {'compile s':>9} {'eager tok/s':>11} {'compile tok/s':>13} {'steady ratio':>12}")
    for packing in (True, False):
        eager, compiled = [], []
        for r in range(args.repeats):
            eager.append(run(os.path.join(work, f"e{r}"), args.steps, args.model, packing, False))
            compiled.append(run(os.path.join(work, f"c{r}"), args.steps, args.model, packing, True))
        (we, te), (wc, tc) = [[statistics.median(x[i] for x in side) for i in (0, 1)] for side in (eager, compiled)]
        print(f"{'packed' if packing else 'per sample':>11} {we:8.1f} {wc:9.1f} {te:11.0f} {tc:13.0f} {tc / te:12.2f}",
              flush=True)


if __name__ == "__main__":
    main()
