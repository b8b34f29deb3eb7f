"""Training speed and peak memory of TRAIN.py's loop against the Hugging Face Trainer, on the same model.

    pip install accelerate          # the Trainer's requirement (only this bench needs it)
    python bench/train_throughput.py [--cases gpt2-11m:8x256,smollm2:2x1024] [--recompute default,cheap]
                                     [--steps 12] [--repeats 2] [--dtypes float32,bfloat16] [--grad-checkpointing]

Identical work on both sides: a randomly initialised model saved as a directory (fine-tuned by both, from
fp32 weights), a 4096-token BPE of data/, the same packed blocks of data/ (documents kept apart, TRAIN.py's
collation: restarting position ids, no padding), BATCHxLENGTH per step, AdamW (lr 3e-4, betas 0.9/0.95, weight
decay 0.1; the Trainer's default, fused, implementation), warmup + cosine, gradient clipping 1.0, the same
autocast precision, CPU, no dropout. Models: smollm2 = SmolLM2-135M's shape (llama, 30 layers, 576 wide,
49152-token vocabulary, tied embeddings); gpt2-11m = GPT-2 of 6x384 with a 1024-token vocabulary (its own BPE);
small/medium = GPT-2 of 6x384 / 10x640 with the 4096-token BPE. --recompute: the TRAIN.py modes to run
(default: none given, TRAIN.py's own choice; cheap, all, none), each against the same Trainer runs. Each run
is a fresh process, alternating, --repeats times. Speed: real tokens/s, median over the steps after the first two, then
over runs. Memory: the process's peak RSS (from wait4), and the floor: fp32 weights + gradients + AdamW's
two moments = 16 bytes per parameter, plus what the process holds after importing torch and transformers.

    pip install trl                 # for --vs trl
    python bench/train_throughput.py --vs trl --model DIR [--cases lora,full]

Chat SFT against TRL's SFTTrainer with its defaults (gradient checkpointing on, TRL's collator; fp32 on both
sides, as bf16 is not native on every CPU): a pretrained chat model DIR (e.g. SmolLM2-135M-Instruct) trained
on data/chat.jsonl's conversations, three times over (96 conversations), 8 a step, 12 steps, LoRA (TRAIN.py's
defaults: r 8, alpha 16, all linear layers, on both sides) or full. Speed: real (unpadded) tokens/s at the
median step after the first two; memory: peak RSS.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODELS = {
    "smollm2": ("llama", dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                              tie_word_embeddings=True, rope_theta=100000.0)),
    "gpt2-11m": ("gpt2", dict(n_layer=6, n_head=6, n_embd=384, n_positions=1024, vocab_size=1024, resid_pdrop=0,
                              embd_pdrop=0, attn_pdrop=0)),
    "small": ("gpt2", dict(n_layer=6, n_head=6, n_embd=384, n_positions=1024, vocab_size=4096, resid_pdrop=0,
                           embd_pdrop=0, attn_pdrop=0)),
    "medium": ("gpt2", dict(n_layer=10, n_head=10, n_embd=640, n_positions=1024, vocab_size=4096, resid_pdrop=0,
                            embd_pdrop=0, attn_pdrop=0)),
}
DATA = ["tests/data/train.txt", "tests/data/train.jsonl"]

TRAINER = """import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from BATCHES import collate, gather, sequences
from DATA import local, token_cache
model_dir, batch, length, steps, dtype, work, gc = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7], sys.argv[8] == "1"
tok = AutoTokenizer.from_pretrained(model_dir)
corpus = token_cache(local(%r), tok, work + "/cache")
blocks = sequences(corpus, 0, len(corpus.ends), length, True)  # TRAIN.py's packed blocks
data = gather(blocks, range(len(blocks)))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
times, tokens = [], []
def collator(b):  # TRAIN.py's collation; the real tokens of each step, for tokens/s as TRAIN.py counts them
    tokens.append(sum(len(ids) for ids, _, _ in b))
    return collate(b, tok.pad_token_id)
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
args = TrainingArguments(output_dir=work + "/trainer", per_device_train_batch_size=batch, max_steps=steps,
    learning_rate=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, warmup_steps=2, lr_scheduler_type="cosine",
    max_grad_norm=1.0, bf16=dtype == "bfloat16", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
    dataloader_num_workers=0, disable_tqdm=True, dataloader_drop_last=True, gradient_checkpointing=gc,
    gradient_checkpointing_kwargs={"use_reentrant": False})  # full batches, as TRAIN.py's
Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Clock()]).train()
print("TOKS", statistics.median(n / t for n, t in zip(tokens[2:], times[2:])))""" % (DATA,)

TRL = """import json, statistics, sys, time, torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer
model_dir, data, work, lora = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
times, tokens = [], []
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
args = SFTConfig(output_dir=work + "/trl", per_device_train_batch_size=8, max_steps=12, bf16=False, use_cpu=True,
                 report_to=[], save_strategy="no", logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data, split="train"),
                     peft_config=peft, callbacks=[Clock()])
collate = trainer.data_collator
def counting(batch):  # the real tokens of each step, as TRAIN.py counts them
    tokens.append(sum(len(b["input_ids"]) for b in batch))
    return collate(batch)
trainer.data_collator = counting
trainer.train()
print("TOKS", statistics.median(n / t for n, t in zip(tokens[2:], times[2:])))"""


def sft_vs_trl(model_dir, lora, work):
    """-> ((TRAIN.py tok/s, peak GB), (TRL tok/s, peak GB)) on data/chat.jsonl x 3."""
    data = os.path.join(work, "chat3.jsonl")
    with open(os.path.join(ROOT, "data", "chat.jsonl")) as f:
        lines = f.read().splitlines()
    with open(data, "w") as f:
        f.write("\n".join(lines * 3) + "\n")
    out = os.path.join(work, "ours-sft")
    _, rss = run_measured([sys.executable, "TRAIN.py", "--model", model_dir, "--data", data, "--out", out,
                           "--overwrite", "--max-steps", "12", "--batch-size", "8", "--grad-accum", "1",
                           "--dtype", "float32", "--device", "cpu", "--log-every", "1", "--save-every", "0",
                           "--cache-dir", work + "/cache-sft"] + (["--lora"] if lora else []))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    ours = statistics.median(r["tokens_per_s"] for r in rows[2:] if "tokens_per_s" in r), rss
    text, rss = run_measured([sys.executable, "-c", TRL, model_dir, data, work, str(int(lora))])
    return ours, (float(text.split("TOKS ")[-1]), rss)


IMPORTS = "import torch, transformers, resource; from transformers import AutoModelForCausalLM, Trainer"


def run_measured(cmd):
    """Popen + wait4 (subprocess.run reaps the child itself and loses its rusage). -> (stdout, peak RSS GB)"""
    with open(os.devnull, "w") as null, tempfile.TemporaryFile("w+") as fh, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=err, stdin=null)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        fh.seek(0), err.seek(0)
        if p.returncode:
            sys.exit(f"{' '.join(map(str, cmd[:4]))} failed:\n{err.read()[-3000:]}")
        return fh.read(), usage.ru_maxrss / 1e6  # ru_maxrss is in kB on Linux


def ours(model_dir, batch, length, steps, dtype, work, recompute):
    """-> (tok/s, peak GB, the recompute mode TRAIN.py logged)"""
    out = os.path.join(work, "ours")
    _, rss = run_measured([sys.executable, "TRAIN.py", "--model", model_dir, "--data", *DATA, "--packing",
                           "--cache-dir", work + "/cache", "--out", out, "--overwrite", "--max-steps", str(steps),
                           "--batch-size", str(batch), "--grad-accum", "1", "--max-length", str(length),
                           "--learning-rate", "3e-4", "--warmup-steps", "2", "--dtype", dtype, "--device", "cpu",
                           "--log-every", "1", "--save-every", "0"]
                          + ([] if recompute == "default" else ["--recompute", recompute]))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return statistics.median(r["tokens_per_s"] for r in rows[2:] if "tokens_per_s" in r), rss


def trainer(model_dir, batch, length, steps, dtype, work, gc):
    out, rss = run_measured([sys.executable, "-c", TRAINER, ROOT, model_dir, str(batch), str(length), str(steps),
                             dtype, work, str(int(gc))])
    return float(out.split("TOKS ")[-1]), rss


def make_model(name, tok, work):
    """A randomly initialised model of that shape, saved with the tokenizer. -> (its directory, parameters)"""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    kind, arch = MODELS[name]
    path = os.path.join(work, name)
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **arch)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def cpu_name():
    """The CPU's model name, and whether it has AVX512-BF16 (bf16 matmuls in hardware)."""
    lines = open("/proc/cpuinfo").read().splitlines()
    name = next((line.split(":")[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line for line in lines if line.startswith("flags")), "").split()
    return f"{name} {'with' if 'avx512_bf16' in flags else 'without'} AVX512-BF16"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="gpt2-11m:8x256,smollm2:2x1024")
    ap.add_argument("--recompute", default="default,cheap", help="TRAIN.py's modes, each against the Trainer")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--grad-checkpointing", action="store_true", help="on both sides (TRAIN.py --recompute all)")
    ap.add_argument("--vs", choices=["trainer", "trl"], default="trainer")
    ap.add_argument("--model", help="--vs trl: the pretrained chat model directory")
    args = ap.parse_args()
    import torch
    if args.vs == "trl":
        work = tempfile.mkdtemp(prefix="llm-mini-trl-bench-")
        print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.model}; chat SFT, 8 a step, 12 steps, fp32")
        print(f"{'mode':>6} {'ours tok/s':>10} {'TRL':>8} {'ratio':>6} | {'ours GB':>7} {'TRL':>8} {'ratio':>6}")
        for mode in (args.cases if args.cases != ap.get_default("cases") else "lora,full").split(","):
            (tps_a, rss_a), (tps_b, rss_b) = sft_vs_trl(args.model, mode == "lora", work)
            print(f"{mode:>6} {tps_a:10.0f} {tps_b:8.0f} {tps_a / tps_b:6.2f} | {rss_a:7.2f} {rss_b:8.2f} "
                  f"{rss_a / rss_b:6.2f}", flush=True)
        return
    from DATA import iter_texts, local
    from TOKENIZER import train_tokenizer
    work = tempfile.mkdtemp(prefix="llm-mini-train-bench-")
    toks = {}
    _, base = run_measured([sys.executable, "-c", IMPORTS])
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.steps} steps, median of {args.repeats} "
          f"run(s) per side, alternating{', gradient checkpointing on both' if args.grad_checkpointing else ''}; a process that imports torch + transformers holds {base:.2f} GB")
    print(f"{'model':>17} {'batch':>7} {'dtype':>8} {'recompute':>9} {'ours tok/s':>10} {'Trainer':>8} {'ratio':>6} | "
          f"{'ours GB':>7} {'Trainer':>8} {'ratio':>6} {'floor':>6}")
    dirs = {}
    for case in args.cases.split(","):
        name, shape = case.split(":")
        batch, length = map(int, shape.split("x"))
        if name not in dirs:
            vocab = 1024 if MODELS[name][1]["vocab_size"] == 1024 else 4096
            if vocab not in toks:
                toks[vocab] = train_tokenizer(iter_texts(local(DATA)), vocab)
            dirs[name] = make_model(name, toks[vocab], work)
        path, n_params = dirs[name]
        modes = ["all"] if args.grad_checkpointing else args.recompute.split(",")
        for dtype in args.dtypes.split(","):
            runs = {mode: [] for mode in modes + ["Trainer"]}
            for _ in range(args.repeats):
                for mode in modes:
                    runs[mode].append(ours(path, batch, length, args.steps, dtype, work, mode))
                runs["Trainer"].append(trainer(path, batch, length, args.steps, dtype, work, args.grad_checkpointing))
            tps_b, rss_b = [statistics.median(x[i] for x in runs["Trainer"]) for i in (0, 1)]
            for mode in modes:
                tps_a, rss_a = [statistics.median(x[i] for x in runs[mode]) for i in (0, 1)]
                print(f"{name:>9} {n_params / 1e6:6.1f}M {batch:>2}x{length:<4} {dtype:>8} {mode:>9} {tps_a:10.0f} "
                      f"{tps_b:8.0f} {tps_a / tps_b:6.2f} | {rss_a:7.2f} {rss_b:8.2f} {rss_a / rss_b:6.2f} "
                      f"{16 * n_params / 1e9 + base:6.2f}", flush=True)


if __name__ == "__main__":
    main()
