"""Training throughput of TRAIN.py's loop against the Hugging Face Trainer, and against the machine.

    pip install accelerate          # the Trainer's requirement (only this bench needs it)
    python bench/train_throughput.py [--steps 12] [--repeats 3] [--sizes small,medium] [--dtypes float32,bfloat16]

Identical work on both sides: a from-scratch GPT-2 (small ~12M, medium ~50M parameters), the same
tokenizer (a 4096-token BPE of data/), the same packed blocks of <= 256 tokens of data/ (documents kept
apart, TRAIN.py's collation), batch 8, AdamW
(lr 3e-4, betas 0.9/0.95, weight decay 0.1), warmup + cosine, gradient clipping 1.0, the same autocast
precision, CPU. Each side runs in a fresh process, alternating, --repeats times; a run's speed is the
median of its steps' real tokens/s after its first two steps, and the figure is the median over runs.
Roofline: achieved FLOP/s (6 x params + 12 x layers x width x block per token, nanoGPT's estimate)
as a fraction of a plain matmul of the model's shapes measured at the same dtype in this process.
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
sys.path.insert(0, ROOT)
SIZES = {"small": dict(n_layer=6, n_head=6, n_embd=384), "medium": dict(n_layer=10, n_head=10, n_embd=640)}
BATCH, BLOCK = 8, 256

TRAINER = """import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from DATA import collate, gather, sequences, token_cache
tok_dir, arch, steps, dtype, work = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
tok = AutoTokenizer.from_pretrained(tok_dir)
corpus = token_cache(["data/train.txt", "data/train.jsonl"], tok, work + "/cache")
data = gather(sequences(corpus, 0, len(corpus.ends), %d, True), range(%d))  # TRAIN.py's packed blocks
torch.manual_seed(0)
config = AutoConfig.for_model("gpt2", n_positions=%d, vocab_size=len(tok), **arch)
model = AutoModelForCausalLM.from_config(config)
times, tokens = [], []
def collator(batch):  # TRAIN.py's collation; the real tokens of each step, for tokens/s as TRAIN.py counts them
    tokens.append(sum(len(ids) for ids, _, _ in batch))
    return collate(batch, tok.pad_token_id)
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
args = TrainingArguments(output_dir=work + "/trainer", per_device_train_batch_size=%d, max_steps=steps,
    learning_rate=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, warmup_steps=2, lr_scheduler_type="cosine",
    max_grad_norm=1.0, bf16=dtype == "bfloat16", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
    dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch")
Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Clock()]).train()
print("TOKS", statistics.median(n / t for n, t in zip(tokens[2:], times[2:])))""" % (BLOCK, 10**6, BLOCK, BATCH)


def ours(tok_dir, arch, steps, dtype, work):
    out = os.path.join(work, "ours")
    subprocess.run([sys.executable, "TRAIN.py", "--model", "gpt2", "--from-scratch", "--tokenizer", tok_dir,
                    "--config-overrides", json.dumps({**arch, "n_positions": BLOCK}), "--cache-dir", work + "/cache",
                    "--out", out, "--overwrite", "--max-steps", str(steps), "--batch-size", str(BATCH),
                    "--max-length", str(BLOCK), "--learning-rate", "3e-4", "--warmup-steps", "2", "--dtype", dtype,
                    "--device", "cpu", "--log-every", "1", "--save-every", "0"],
                   cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return statistics.median(r["tokens_per_s"] for r in rows[2:])


def trainer(tok_dir, arch, steps, dtype, work):
    r = subprocess.run([sys.executable, "-c", TRAINER, ROOT, tok_dir, json.dumps(arch), str(steps), dtype, work],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    return float(r.stdout.split("TOKS ")[-1])


def matmul_flops(d, dtype, repeats=20):
    """FLOP/s of (BATCH*BLOCK, d) @ (d, 4d), the shape of the MLP's first matmul."""
    import torch
    a = torch.randn(BATCH * BLOCK, d, dtype=dtype)
    b = torch.randn(d, 4 * d, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * BATCH * BLOCK * d * 4 * d / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    import torch
    from TOKENIZER import train_tokenizer
    from DATA import iter_texts
    work = tempfile.mkdtemp(prefix="llm-mini-train-bench-")
    tok_dir = os.path.join(work, "tok")
    train_tokenizer(iter_texts(["data/train.txt", "data/train.jsonl"]), 4096).save_pretrained(tok_dir)
    print(f"CPU, {os.cpu_count()} cores, torch {torch.__version__}; batch {BATCH} x {BLOCK} tokens, {args.steps} steps, "
          f"median of {args.repeats} runs per side, alternating")
    print(f"{'model':>14} {'dtype':>9} {'ours tok/s':>11} {'Trainer':>9} {'ratio':>6} {'TFLOP/s':>8} {'matmul':>7} "
          f"{'roofline':>8}")
    for size in args.sizes.split(","):
        arch = SIZES[size]
        d, L = arch["n_embd"], arch["n_layer"]
        n_params = 12 * L * d * d + 4096 * d + BLOCK * d  # blocks + embeddings (tied head)
        flops_per_token = 6 * n_params + 12 * L * d * BLOCK
        for dtype in args.dtypes.split(","):
            a, b = [], []
            for _ in range(args.repeats):
                a.append(ours(tok_dir, arch, args.steps, dtype, work))
                b.append(trainer(tok_dir, arch, args.steps, dtype, work))
            ours_tps, hf_tps = statistics.median(a), statistics.median(b)
            achieved = flops_per_token * ours_tps
            peak = matmul_flops(d, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
            print(f"{size:>6} {n_params / 1e6:5.1f}M {dtype:>9} {ours_tps:11.0f} {hf_tps:9.0f} "
                  f"{ours_tps / hf_tps:6.2f} {achieved / 1e12:8.3f} {peak / 1e12:7.3f} {achieved / peak:8.2f}", flush=True)


if __name__ == "__main__":
    main()
