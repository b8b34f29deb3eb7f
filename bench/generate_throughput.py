"""Generation speed of INFER.py against bare transformers, and INFER.py's cold start.

    python bench/generate_throughput.py [--repeats 5] [--new-tokens 200]

Builds a randomly initialised GPT-2 (~10M parameters) with a tokenizer trained on data/, so no training
run is needed. Both sides are measured in this run, interleaved, and the median is reported.
  generation: (time for N tokens - time for 1 token) of a fresh process -> tokens/s, for INFER.py end to
              end versus a bare script calling model.generate(do_sample=False) on the same model and prompt.
  cold start: `INFER.py --max-new-tokens 1` versus `python -c "import transformers" + from_pretrained`.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


BARE = """import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model, tok = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(), AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok(sys.argv[2], return_tensors="pt")["input_ids"]
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[3]), do_sample=False,
                         pad_token_id=tok.eos_token_id)
print(tok.decode(out[0, ids.shape[1]:]))
"""


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=800)
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from DATA import iter_texts, local
    from TOKENIZER import train_tokenizer

    tmp = tempfile.mkdtemp()
    tok = train_tokenizer(iter_texts(local(["tests/data/train.txt", "tests/data/train.jsonl"])), 4096)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", n_layer=6, n_head=8, n_embd=256, n_positions=1024, vocab_size=len(tok),
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    prompt = "Once upon a time"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    infer = [sys.executable, "INFER.py", "--model", tmp, "--prompt", prompt, "--greedy", "--device", "cpu"]
    bare_start = [sys.executable, "-c", "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                  "AutoModelForCausalLM.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1])", tmp]
    bare_gen = [sys.executable, "-c", BARE, tmp, prompt]

    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    n_new = out.shape[1] - ids.shape[1]
    ours, bare, cold_ours, cold_bare = [], [], [], []
    for _ in range(args.repeats):
        t_n = timed(infer + ["--max-new-tokens", str(args.new_tokens)])
        t_1 = timed(infer + ["--max-new-tokens", "1"])
        ours.append((n_new - 1) / (t_n - t_1))
        cold_ours.append(t_1)
        cold_bare.append(timed(bare_start))
        bare.append((n_new - 1) / (timed(bare_gen + [str(args.new_tokens)]) - timed(bare_gen + ["1"])))
    med = statistics.median
    print(f"model: random GPT-2, {n_params / 1e6:.1f}M params, {n_new} new tokens, greedy, CPU, torch "
          f"{torch.__version__}, {os.cpu_count()} cores, median of {args.repeats}")
    print(f"generation  INFER.py {med(ours):8.1f} tok/s   bare generate {med(bare):8.1f} tok/s   "
          f"ratio {med(ours) / med(bare):.3f}")
    print(f"cold start  INFER.py {med(cold_ours):8.2f} s       import+load   {med(cold_bare):8.2f} s       "
          f"ratio {med(cold_ours) / med(cold_bare):.3f}")


if __name__ == "__main__":
    main()
