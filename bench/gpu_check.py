"""One prepared check of every CUDA path of LLM-MINI, with MFU: the first thing to run on a new GPU machine.

    python bench/gpu_check.py                    # on a CUDA machine: every check (budgets sized for < 8 min)
    python bench/gpu_check.py --quick            # toy sizes on the CPU (< 2 min): the harness, and what needs CUDA
    python bench/gpu_check.py --only train,infer --json results.json --smollm2 DIR

Each check runs the project's own scripts as a user types them (TRAIN.py, INFER.py, EVAL.py in
subprocesses, under a time budget) and says what it ran and what it measured; one failing check is
reported and the rest still run. The table is printed and written as JSON (--json, default
$OUT/gpu_check.json where $OUT is set, else gpu_check.json). Exit status 1 if any check failed.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets; matched against torch's device name
PEAK_BF16 = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L4": 121, "RTX 4090": 165}
GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768}


def peak_tflops(name):
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sh(args, budget, env=None, check=True):
    """Run a command from the repository root; its output, or an error that names it and shows its tail."""
    r = subprocess.run(list(map(str, args)), cwd=ROOT, capture_output=True, text=True, timeout=budget,
                       env={**os.environ, **(env or {})})
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(map(str, args[1:4]))}… exited {r.returncode}: {r.stderr.strip()[-600:]}")
    return r


def script(name, *args, budget=300, **kw):
    return sh([sys.executable, name, *args], budget, **kw)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def corpus(path, n_lines):
    """Generated text: random runs of the sentences in tests/data/train.txt, one document per line."""
    import random
    rng, lines = random.Random(0), [l.strip() for l in open(os.path.join(ROOT, "tests", "data", "train.txt")) if l.strip()]
    with open(path, "w") as fh:
        for _ in range(n_lines):
            fh.write(" ".join(rng.choice(lines) for _ in range(rng.randint(3, 12))) + "\n")
    return path


class Ctx:
    """What the checks share: sizes for --quick or the GPU, the work folder, the generated data."""

    def __init__(self, quick, work, smollm2):
        import torch
        self.quick, self.work, self.smollm2 = quick, work, smollm2
        self.cuda = torch.cuda.is_available() and not quick
        self.device = "cuda" if self.cuda else "cpu"
        self.gpus = torch.cuda.device_count() if self.cuda else 0
        self.name = torch.cuda.get_device_name() if self.cuda else "CPU"
        self.dtype = "bfloat16" if self.cuda else "float32"
        self.arch = GPT2_124M if self.cuda else {"n_layer": 2, "n_head": 2, "n_embd": 64}
        self.seq, self.batch, self.steps = (1024, 16, 30) if self.cuda else (64, 4, 6)
        self.data = corpus(os.path.join(work, "gen.txt"), 20000 if self.cuda else 400)
        self.common = ["--data", self.data, "--cache-dir", os.path.join(work, "cache"), "--device", self.device,
                       "--save-every", "0", "--log-every", "5" if self.cuda else "2"]

    def scratch(self, out, *extra, arch=None, seq=None, steps=None, dtype=None):
        """A from-scratch GPT-2 run of TRAIN.py; returns its metrics rows."""
        seq = seq or self.seq
        script("TRAIN.py", "--model", "gpt2", "--from-scratch", "--config-overrides",
               json.dumps({**(arch or self.arch), "n_positions": seq}), "--vocab-size", 8192, "--max-length", seq,
               "--batch-size", self.batch, "--max-steps", steps or self.steps, "--dtype", dtype or self.dtype,
               "--packing", "--out", out, "--overwrite", *self.common, *extra, budget=600)
        return metrics(out)


def flops_per_token(arch, seq, n_params):
    return 6 * n_params + 12 * arch["n_layer"] * arch["n_embd"] * seq  # nanoGPT's estimate


def check_train(ctx):
    """1. bf16 autocast training of a GPT-2 124M-shape model, packed seq 1024: tok/s, MFU, peak memory."""
    from transformers import AutoConfig
    out = {}
    for compiled in ([False, True] if ctx.cuda else [False]):
        run = os.path.join(ctx.work, "train-compiled" if compiled else "train")
        rows = ctx.scratch(run, *(["--compile"] if compiled else []))
        out["compile" if compiled else "eager"] = statistics.median(r["tokens_per_s"] for r in rows[1:] or rows)
        out.setdefault("max_memory_gb", rows[-1].get("max_memory_gb"))
    cfg = AutoConfig.from_pretrained(os.path.join(ctx.work, "train"))
    n = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_config(cfg).parameters())
    peak = peak_tflops(ctx.name)
    result = {"params_M": round(n / 1e6, 1), "tokens_per_s": round(out["eager"]),
              "floor_gb": round(16 * n / 1e9, 2)}  # fp32 weights + grads + AdamW's two moments
    if "compile" in out:
        result["tokens_per_s_compiled"] = round(out["compile"])
    if peak:
        fpt = flops_per_token(ctx.arch, ctx.seq, n)
        result.update({f"mfu{k}": round(v * fpt / (peak * 1e12), 3) for k, v in
                       (("", out["eager"]), ("_compiled", out.get("compile"))) if v})
    result["max_memory_gb"] = out["max_memory_gb"]
    return result, None if ctx.cuda else "CUDA: --compile, bf16 and MFU are measured on a GPU only"


TRAINER = r"""import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from BATCHES import collate, gather, sequences
from DATA import local, token_cache
run, data, cache, seq, batch, steps, dtype, device = sys.argv[2:10]
tok = AutoTokenizer.from_pretrained(run)
corpus = token_cache(local([data]), tok, cache)
seqs = sequences(corpus, 0, len(corpus.ends), int(seq), True)
rows = gather(seqs, range(len(seqs)))
model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(run).config)
times, tokens = [], []
def collator(b):
    tokens.append(sum(len(ids) for ids, _, _ in b))
    return collate(b, tok.pad_token_id)
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        times.append(time.perf_counter() - self.t)
args = TrainingArguments(output_dir=run + "-trainer", per_device_train_batch_size=int(batch), max_steps=int(steps),
    learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, warmup_steps=-(-int(steps) // 20),
    lr_scheduler_type="cosine",
    max_grad_norm=1.0, bf16=dtype == "bfloat16", use_cpu=device == "cpu", report_to=[], save_strategy="no",
    logging_steps=10**6, dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch_fused" if device == "cuda" else "adamw_torch")
Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()]).train()
print("TOKS", statistics.median(n / t for n, t in zip(tokens[1:], times[1:])))
"""


def check_trainer(ctx):
    """2. The same run under the Hugging Face Trainer (identical model, data, settings): the ratio."""
    run = os.path.join(ctx.work, "train")
    if not os.path.exists(os.path.join(run, "config.json")):
        ctx.scratch(run)
    ours = statistics.median(r["tokens_per_s"] for r in metrics(run)[1:] or metrics(run))
    r = sh([sys.executable, "-c", TRAINER, ROOT, run, ctx.data, os.path.join(ctx.work, "cache"), ctx.seq, ctx.batch,
            ctx.steps, ctx.dtype, ctx.device], 600)
    theirs = float(r.stdout.split("TOKS ")[-1])
    return {"ours_tokens_per_s": round(ours), "trainer_tokens_per_s": round(theirs), "ratio": round(ours / theirs, 3)}, None


def check_fp16(ctx):
    """3. fp16 autocast + GradScaler: an inf gradient skips the step (weights unchanged) and halves the scale;
    the scale survives a resume. The inf comes from a learning rate of 1e30: after the first step the
    weights overflow fp16, so every later gradient is inf."""
    if not ctx.cuda:
        return None, "needs CUDA (float16 training is refused on the CPU)"
    import torch
    out = os.path.join(ctx.work, "fp16")
    small, args = {"n_layer": 2, "n_head": 4, "n_embd": 128}, ["--learning-rate", "1e30", "--warmup-steps", "0",
                                                               "--save-every", "1"]
    ctx.scratch(out, *args, arch=small, seq=128, steps=3, dtype="float16")
    ctx.scratch(out, *args, "--resume", "auto", arch=small, seq=128, steps=4, dtype="float16")
    scale = {s: float(torch.load(os.path.join(out, f"ckpt-step-{s}", "training_state.pt"), weights_only=True)
                      ["scaler"]["scale"]) for s in (2, 3, 4)}
    same = max_diff(weights(os.path.join(out, "ckpt-step-2")), weights(os.path.join(out, "ckpt-step-3")))
    ok = same == 0 and scale[3] == scale[2] / 2 and scale[4] == scale[3] / 2
    return {"scale_step_2_3_4": [scale[2], scale[3], scale[4]], "max_weight_change_skipped_step": same,
            "ok": ok}, None


def check_resume(ctx):
    """4. Resume: a straight run against one interrupted by SIGINT and continued with --resume auto,
    --deterministic: the final weights (equal, or the largest difference)."""
    small = {"n_layer": 4, "n_head": 4, "n_embd": 256} if ctx.cuda else ctx.arch
    base = ["--model", "gpt2", "--from-scratch", "--config-overrides", json.dumps({**small, "n_positions": 256}),
            "--vocab-size", 8192, "--max-length", 256, "--batch-size", ctx.batch, "--max-steps", 12, "--dtype", ctx.dtype,
            "--packing", "--deterministic", *ctx.common[:-2], "--log-every", 1]
    straight, cut = os.path.join(ctx.work, "straight"), os.path.join(ctx.work, "cut")
    script("TRAIN.py", *base, "--out", straight, "--overwrite", budget=300)
    proc = subprocess.Popen([sys.executable, "TRAIN.py", *map(str, base), "--out", cut, "--overwrite", "--save-every", "3"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not (os.path.exists(os.path.join(cut, "ckpt-step-3")) or proc.poll() is not None) and time.time() - start < 300:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    interrupted = proc.wait(120)
    script("TRAIN.py", *base, "--out", cut, "--save-every", 3, "--resume", "auto", budget=300)
    diff = max_diff(weights(straight), weights(cut))
    return {"interrupted_exit": interrupted, "max_abs_weight_diff": diff, "ok": diff == 0}, None


def check_attention(ctx):
    """5. sdpa against eager attention (and flash_attention_2 where it imports): EVAL.py perplexity of one model."""
    import importlib.util
    run = os.path.join(ctx.work, "train")
    if not os.path.exists(os.path.join(run, "config.json")):
        ctx.scratch(run)
    sample = corpus(os.path.join(ctx.work, "eval.txt"), 200 if ctx.cuda else 40)
    kinds = ["sdpa", "eager"] + (["flash_attention_2"] if ctx.cuda and importlib.util.find_spec("flash_attn") else [])
    result = {}
    for impl in kinds:
        t = time.perf_counter()
        r = script("EVAL.py", "--model", run, "--data", sample, "--device", ctx.device, "--attn-implementation", impl,
                   "--dtype", ctx.dtype, "--batch-size", 8, budget=300)
        result[impl] = {"perplexity": float(r.stdout.split()[1]), "seconds": round(time.perf_counter() - t, 1)}
    spread = max(v["perplexity"] for v in result.values()) / min(v["perplexity"] for v in result.values()) - 1
    result["relative_spread"] = spread
    note = None if "flash_attention_2" in result else "flash_attention_2: needs CUDA and the flash-attn package"
    return result, note


def check_lora(ctx):
    """6. LoRA on a pretrained model (the SmolLM2 fixture when given, else a tiny llama trained here), then
    INFER.py on the adapter; QLoRA where bitsandbytes imports."""
    import importlib.util
    base = ctx.smollm2
    if not base:
        base = os.path.join(ctx.work, "llama")
        script("TRAIN.py", "--model", "llama", "--from-scratch", "--config-overrides",
               "{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
               "intermediate_size: 128, max_position_embeddings: 256}", "--vocab-size", 1024, "--max-steps", 4,
               "--batch-size", 4, "--out", base, "--overwrite", *ctx.common, budget=300)
    result, notes = {}, []
    for kind in ["lora"] + (["qlora"] if ctx.cuda and importlib.util.find_spec("bitsandbytes") else []):
        out = os.path.join(ctx.work, kind)
        script("TRAIN.py", "--model", base, f"--{kind}", "--max-steps", 4, "--batch-size", 4, "--max-length", 256,
               "--out", out, "--overwrite", *ctx.common, budget=300)
        rows = metrics(out)
        g = script("INFER.py", "--model", out, "--prompt", "Once upon a time", "--greedy", "--max-new-tokens", 8,
                   "--device", ctx.device, budget=120)
        result[kind] = {"tokens_per_s": round(rows[-1]["tokens_per_s"]), "max_memory_gb": rows[-1].get("max_memory_gb"),
                        "infer_ok": g.returncode == 0}
    if "qlora" not in result:
        notes.append("QLoRA: needs CUDA and the bitsandbytes package")
    return result, "; ".join(notes) or None


def check_infer(ctx):
    """7. INFER.py --greedy equals transformers' generate on the same device and dtype; generation tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run = os.path.join(ctx.work, "train")
    if not os.path.exists(os.path.join(run, "config.json")):
        ctx.scratch(run)
    prompts = ["Once upon a time", "The little fox", "Every morning the river"]
    r = subprocess.run([sys.executable, "INFER.py", "--model", run, "--each-line", "--jsonl", "--greedy",
                        "--max-new-tokens", "32", "--device", ctx.device, "--dtype", ctx.dtype], cwd=ROOT,
                       input="\n".join(prompts) + "\n", capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"INFER.py exited {r.returncode}: {r.stderr.strip()[-600:]}")
    ours = [json.loads(line)["completion"] for line in r.stdout.splitlines()]
    dtype = getattr(torch, ctx.dtype)
    tok = AutoTokenizer.from_pretrained(run)
    model = AutoModelForCausalLM.from_pretrained(run, dtype=dtype).to(ctx.device).eval()
    theirs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"].to(ctx.device)
        new = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        new = new.tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        theirs.append(tok.decode(new, skip_special_tokens=True))
    n = 16 if ctx.quick else 256  # within the toy model's context of 64
    ids = tok(prompts[0], return_tensors="pt")["input_ids"].to(ctx.device)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
    sync = torch.cuda.synchronize if ctx.cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    sync()
    return {"greedy_equal": f"{sum(a == b for a, b in zip(ours, theirs))}/{len(prompts)}",
            "generate_tokens_per_s": round(n / (time.perf_counter() - t)), "dtype": ctx.dtype,
            "ok": ours == theirs}, None


def check_decode(ctx):
    """9. Decoding speed of a SmolLM2-135M-shaped llama (random weights): tokens/s of one stream and of 8,
    transformers' eager generate against DECODE.py's static KV cache + compiled step (the compile's seconds
    apart; batch 8 compiles again), and --dtype int8 (QUANT.py); the compiled greedy tokens against the eager ones."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import DECODE
    import QUANT
    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152) if ctx.cuda else \
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **shape, max_position_embeddings=2048, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).to(ctx.device, getattr(torch, ctx.dtype)).eval()
    n, sync = (128 if ctx.cuda else 16), torch.cuda.synchronize if ctx.cuda else (lambda: None)
    compiled = DECODE.compiled_step(model)
    ways = {"eager": lambda: {}, "static_compiled": lambda: {
        "compile_config": compiled, "cache": DECODE.static_cache(model, 16 + n, cfg.max_position_embeddings)}}

    prompts = torch.randint(0, shape["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(0))

    def speed(model, batch, extra):
        ids = prompts[:batch].to(ctx.device)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, **extra())
        sync()
        return batch * n / (time.perf_counter() - t), out[0, 16:].tolist()
    result = {}
    for way, extra in ways.items():
        t = time.perf_counter()
        speed(model, 1, extra)  # the first call compiles (static_compiled) or warms up
        result[f"{way}_first_call_s"] = round(time.perf_counter() - t, 1)
        result[f"{way}_tok_s"], tokens = speed(model, 1, extra)
        speed(model, 8, extra)  # batch 8: a shape of its own, compiled again
        result[f"{way}_x8_tok_s"] = speed(model, 8, extra)[0]
        result[f"{way}_tokens"] = tokens
    same = sum(a == b for a, b in zip(result.pop("eager_tokens"), result.pop("static_compiled_tokens")))
    try:  # int8 weights: bf16 activations on a device with native bf16
        result["int8_tok_s"] = speed(QUANT.to_int8(model.to(torch.bfloat16), torch.bfloat16), 1, dict)[0]
    except Exception as e:  # noqa: BLE001 - a device without the kernel: said, not fatal
        result["int8"] = f"{type(e).__name__}: {str(e)[:200]}"
    result = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}
    return {**result, "greedy_equal_compiled": f"{same}/{n}", "ok": same == n or ctx.dtype != "float32"}, None


def check_ddp(ctx):
    """8. DDP with NCCL over every visible GPU (gloo over 2 CPU processes with --quick): weights equal to one
    process with the same global batch, to the tolerance reached."""
    n = ctx.gpus if ctx.cuda else 2
    if ctx.cuda and n < 2:
        return None, f"needs 2 or more GPUs ({n} visible)"
    small = ["--model", "gpt2", "--from-scratch", "--config-overrides",
             json.dumps({**ctx.arch, "n_positions": 256, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}),
             "--vocab-size", 8192, "--max-length", 256, "--max-steps", 3, "--dtype", "float32", "--packing",
             *ctx.common]
    one, many = os.path.join(ctx.work, "ddp-1"), os.path.join(ctx.work, f"ddp-{n}")
    script("TRAIN.py", *small, "--batch-size", 2 * n, "--out", one, "--overwrite", budget=300)
    sh([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "TRAIN.py",
        *small, "--batch-size", "2", "--out", many, "--overwrite"], 300)
    diff = max_diff(weights(one), weights(many))
    return {"processes": n, "backend": "nccl" if ctx.cuda else "gloo", "max_abs_weight_diff": diff,
            "ok": diff < 1e-4}, None


CHECKS = {"train": check_train, "trainer": check_trainer, "fp16": check_fp16, "resume": check_resume,
          "attention": check_attention, "lora": check_lora, "infer": check_infer, "decode": check_decode,
          "ddp": check_ddp}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes on the CPU")
    ap.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks to run")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--smollm2", default=None, help="a SmolLM2-135M-Instruct directory for the LoRA check")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    args = ap.parse_args()
    unknown = [n for n in args.only.split(",") if n not in CHECKS]
    if unknown:
        ap.error(f"unknown check {', '.join(unknown)} - choose from {', '.join(CHECKS)}")
    import torch
    import transformers
    work = args.work or tempfile.mkdtemp(prefix="llm-mini-gpu-check-")
    os.makedirs(work, exist_ok=True)
    ctx = Ctx(args.quick, work, args.smollm2)
    head = {"device": ctx.name, "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "quick": args.quick, "peak_bf16_tflops": peak_tflops(ctx.name)}
    print(" | ".join(f"{k} {v}" for k, v in head.items()), flush=True)
    rows, failed = [], 0
    for name in args.only.split(","):
        t = time.perf_counter()
        try:
            measured, note = CHECKS[name](ctx)
            status = "skipped" if measured is None else "FAILED" if measured.get("ok") is False else "ok"
        except Exception as e:  # one failing check is reported; the others still run
            measured, note, status = None, f"{type(e).__name__}: {str(e)[-800:]}", "FAILED"
        failed += status == "FAILED"
        rows.append({"check": name, "status": status, "seconds": round(time.perf_counter() - t, 1),
                     "what": CHECKS[name].__doc__.split(":")[0].strip(), "measured": measured, "note": note})
        print(f"{name:>9} {status:>7} {rows[-1]['seconds']:6.1f}s  {json.dumps(measured)}" + (f"  ({note})" if note else ""),
              flush=True)
    with open(args.json, "w") as fh:
        json.dump({**head, "checks": rows}, fh, indent=1)
    print(f"wrote {args.json}; {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
