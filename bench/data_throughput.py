"""Tokenization throughput and memory of DATA.py's token cache, against the `datasets` library.

    pip install datasets pyarrow    # the baseline, and Parquet (optional; only this bench needs datasets)
    python bench/data_throughput.py [--gb 1.0] [--slice-mb 100] [--repeats 3] [--work /tmp/llm-mini-bench]
                                    [--part all|jsonl|parquet]

1. Generates a .jsonl of --gb GB (documents of 1-12 random lines of data/, not committed).
2. Speed on the first --slice-mb MB, interleaved, median of --repeats: DATA.token_cache (streamed,
   written to a memory-mapped file) vs datasets' load_dataset("json") + map(tokenizer, batched=True,
   num_proc=cores), with the same tokenizer (a 4096-token BPE trained on data/).
3. Peak RSS of a fresh process tokenizing the whole file, then of 50 training steps on it (a 10M GPT-2
   from scratch, packing, batch 8 x 256 tokens), against the 2 GB budget.
4. The data loader's share of step time: sample order + gather from the memory map + collate, per step.
5. Parquet: the same rows as a folder of Parquet shards (row groups of 10,000 rows); the whole folder through
   DATA.token_cache (read a row group at a time) vs datasets' load_dataset("parquet") + map(tokenizer,
   batched=True, num_proc=cores), one fresh process each, and the peak RSS of ours.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def child(code, *args):
    """Run code in a fresh python; return (seconds, peak RSS in MB of that process, stdout)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", "import resource, sys; sys.path.insert(0, sys.argv[1]); " + code +
                        "\nprint('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)", ROOT, *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr)
    rss = int(p.stdout.split("RSS ")[-1]) / 1024
    return time.perf_counter() - t, rss, p.stdout


OURS = """from DATA import local, token_cache
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
corpus = token_cache(local([sys.argv[3]]), tok, sys.argv[4])
print('TOKENS', len(corpus.tokens))"""

BASELINE_PARQUET = """import os, glob
import pyarrow.compute as pc
from datasets import load_dataset
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
ds = load_dataset('parquet', data_files=sorted(glob.glob(sys.argv[3] + '/*.parquet')), split='train', cache_dir=sys.argv[4])
ds = ds.map(lambda b: tok(b['text']), batched=True, num_proc=os.cpu_count(), remove_columns=['text'])
print('TOKENS', pc.sum(pc.list_value_length(ds.data.column('input_ids'))).as_py())  # in Arrow"""

BASELINE = """import os
import pyarrow.compute as pc
from datasets import load_dataset
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
ds = load_dataset('json', data_files=sys.argv[3], split='train', cache_dir=sys.argv[4])
ds = ds.map(lambda b: tok(b['text']), batched=True, num_proc=os.cpu_count(), remove_columns=['text'])
print('TOKENS', pc.sum(pc.list_value_length(ds.data.column('input_ids'))).as_py())  # in Arrow"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--slice-mb", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/llm-mini-bench")
    ap.add_argument("--part", choices=["all", "jsonl", "parquet"], default="all")
    args = ap.parse_args()
    from DATA import iter_texts, local
    from TOKENIZER import train_tokenizer
    os.makedirs(args.work, exist_ok=True)
    tok_dir, big, small = (os.path.join(args.work, n) for n in ("tokenizer", "big.jsonl", "slice.jsonl"))
    train_tokenizer(iter_texts(local(["tests/data/train.txt", "tests/data/train.jsonl"])), 4096).save_pretrained(tok_dir)

    lines, rng = list(iter_texts(local(["tests/data/train.txt", "tests/data/train.jsonl"]))), random.Random(0)
    if not os.path.exists(big) or os.path.getsize(big) < args.gb * 1e9:
        with open(big, "w") as fh:
            while fh.tell() < args.gb * 1e9:
                fh.write("".join(json.dumps({"text": " ".join(rng.choices(lines, k=rng.randint(1, 12)))}) + "\n"
                                 for _ in range(10_000)))
    with open(big, "rb") as src, open(small, "wb") as dst:
        for line in src:  # the first --slice-mb MB (or all of a smaller file)
            if dst.tell() >= args.slice_mb * 1e6:
                break
            dst.write(line)
    mb_small, mb_big = os.path.getsize(small) / 1e6, os.path.getsize(big) / 1e6
    if args.part in ("all", "jsonl"):
        jsonl(args, tok_dir, big, small, mb_small, mb_big)
    if args.part in ("all", "parquet"):
        parquet(args, tok_dir, big, mb_big)


def parquet(args, tok_dir, big, mb_big):
    """The .jsonl's rows as Parquet shards of about 100 MB; the whole folder through both, once each."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = os.path.join(args.work, "parquet")
    if not os.path.exists(os.path.join(folder, "done")):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        shard, size, rows, writer = 0, 0, [], None
        with open(big) as fh:
            for line in fh:
                rows.append(json.loads(line)["text"])
                size += len(line)
                if len(rows) == 10_000:
                    writer = writer or pq.ParquetWriter(os.path.join(folder, f"{shard:05d}.parquet"),
                                                        pa.schema([("text", pa.string())]))
                    writer.write_table(pa.table({"text": pa.array(rows, pa.string())}))
                    rows = []
                    if size > 100e6:
                        writer.close()
                        shard, size, writer = shard + 1, 0, None
        if rows:
            writer = writer or pq.ParquetWriter(os.path.join(folder, f"{shard:05d}.parquet"),
                                                pa.schema([("text", pa.string())]))
            writer.write_table(pa.table({"text": pa.array(rows, pa.string())}))
        if writer:
            writer.close()
        open(os.path.join(folder, "done"), "w").close()
    files = [f for f in os.listdir(folder) if f.endswith(".parquet")]
    mb = sum(os.path.getsize(os.path.join(folder, f)) for f in files) / 1e6
    shutil.rmtree(os.path.join(args.work, "cache-parquet"), ignore_errors=True)
    shutil.rmtree(os.path.join(args.work, "ds-cache-parquet"), ignore_errors=True)
    t_ours, rss, out = child(OURS, tok_dir, folder, os.path.join(args.work, "cache-parquet"))
    n_tok = int(out.split("TOKENS ")[1].split()[0])
    t_base, rss_base, out = child(BASELINE_PARQUET, tok_dir, folder, os.path.join(args.work, "ds-cache-parquet"))
    assert int(out.split("TOKENS ")[1].split()[0]) == n_tok - sum(1 for _ in open(big)), "not the same tokens"
    print(f"Parquet: {len(files)} shards, {mb:.0f} MB on disk ({mb_big:.0f} MB as .jsonl), {n_tok / 1e6:.0f}M tokens, "
          f"{os.cpu_count()} cores, one fresh process each, process start included:")
    print(f"  DATA.token_cache   {n_tok / t_ours / 1e6:6.2f}M tok/s ({t_ours:.0f} s)  peak RSS {rss:6.0f} MB")
    print(f"  datasets map       {n_tok / t_base / 1e6:6.2f}M tok/s ({t_base:.0f} s)  peak RSS {rss_base:6.0f} MB "
          "(main process only)")
    print(f"  ratio (ours / datasets) {t_base / t_ours:.2f}x")


def jsonl(args, tok_dir, big, small, mb_small, mb_big):
    ours, base = [], []
    for _ in range(args.repeats):
        shutil.rmtree(os.path.join(args.work, "cache-slice"), ignore_errors=True)
        shutil.rmtree(os.path.join(args.work, "ds-cache"), ignore_errors=True)
        ours.append(child(OURS, tok_dir, small, os.path.join(args.work, "cache-slice")))
        base.append(child(BASELINE, tok_dir, small, os.path.join(args.work, "ds-cache")))
    n_tok = int(ours[0][2].split("TOKENS ")[1].split()[0])
    t_ours, t_base = statistics.median(o[0] for o in ours), statistics.median(b[0] for b in base)
    print(f"tokenize {mb_small:.0f} MB slice ({n_tok / 1e6:.1f}M tokens), {os.cpu_count()} cores, median of "
          f"{args.repeats}, process start included:")
    print(f"  DATA.token_cache   {mb_small / t_ours:6.2f} MB/s {n_tok / t_ours / 1e6:6.2f}M tok/s  peak RSS "
          f"{statistics.median(o[1] for o in ours):6.0f} MB")
    print(f"  datasets map       {mb_small / t_base:6.2f} MB/s {n_tok / t_base / 1e6:6.2f}M tok/s  peak RSS "
          f"{statistics.median(b[1] for b in base):6.0f} MB (main process only)")
    print(f"  ratio (ours / datasets) {t_base / t_ours:.2f}x")

    cache = os.path.join(args.work, "cache-big")
    shutil.rmtree(cache, ignore_errors=True)
    dt, rss, out = child(OURS, tok_dir, big, cache)
    n_big = int(out.split("TOKENS ")[1].split()[0])
    print(f"tokenize the whole {mb_big:.0f} MB file: {dt:.0f} s ({mb_big / dt:.2f} MB/s, {n_big / 1e6:.0f}M tokens), "
          f"peak RSS {rss:.0f} MB")

    out_dir = os.path.join(args.work, "out")
    shutil.rmtree(out_dir, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "TRAIN.py", "--model", "gpt2", "--from-scratch", "--tokenizer", tok_dir,
                             "--config-overrides", "{n_layer: 6, n_head: 8, n_embd: 256, n_positions: 256}",
                             "--data", big, "--cache-dir", cache, "--out", out_dir, "--max-steps", "50",
                             "--batch-size", "8", "--max-length", "256", "--log-every", "10", "--save-every", "0"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak RSS
    if status:
        sys.exit("TRAIN.py failed")
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    print(f"50 training steps on it (10M GPT-2): {time.perf_counter() - t:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} "
          f"MB (budget 2048 MB), {statistics.median(r['tokens_per_s'] for r in rows[1:]):.0f} tok/s")

    import numpy as np
    from BATCHES import collate, gather, sample_indices, sequences
    from transformers import AutoTokenizer
    from DATA import local, token_cache
    corpus = token_cache(local([big]), AutoTokenizer.from_pretrained(tok_dir), cache)
    t = time.perf_counter()
    blocks = sequences(corpus, 0, len(corpus.ends), 256, packing=True)
    print(f"packing {len(corpus.ends)} documents into {len(blocks)} blocks: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    for step in range(50):
        idx = sample_indices(step * 8, 8, len(blocks), 1337)
        collate(gather(blocks, idx), 0)
    loader = (time.perf_counter() - t) / 50
    step_time = 8 * 256 / statistics.median(r["tokens_per_s"] for r in rows[1:])
    print(f"data loader: {loader * 1e3:.1f} ms per step of {step_time * 1e3:.0f} ms ({loader / step_time:.1%}); "
          f"{len(blocks)} blocks, the epoch order alone is a {len(blocks) * 8 / 1e6:.0f} MB permutation")
    del np


if __name__ == "__main__":
    main()
