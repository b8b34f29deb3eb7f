"""What a training step holds, and what it costs to hold less: five ways to keep (or recompute) activations.

    python bench/activation_memory.py [--batch 2] [--length 1024] [--layers 30] [--steps 3] [--cases a,b,c,d,e]

A SmolLM2-135M-shaped llama (576 wide, 30 layers, 49152-token vocabulary, tied embeddings), fp32, CPU, with
LOSS.py's chunked loss; full steps (forward, backward, fused AdamW). Each case runs in a fresh process:
  a  today: autograd keeps what it keeps                     (--recompute none)
  b  torch.compile (inductor's partitioner recomputes cheap ops in backward)
  c  autograd Functions for SwiGLU and RMSNorm that keep their inputs only (swapped in at run time)
  d  selective activation checkpointing: matmul and attention outputs kept, the rest recomputed (RECOMPUTE.py,
     --recompute cheap)
  e  full gradient checkpointing                             (--recompute all)
Printed per case: the memory the forward leaves for backward (RSS after the forward minus before it, the
last step), the process's peak RSS, and the median step time over the steps after the first; ratios against
(a) of the same run. glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so that RSS follows the
tensors that are alive rather than what the allocator keeps back.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
NAMES = {"a": "today (keep everything)", "b": "torch.compile", "c": "autograd Functions (SwiGLU, RMSNorm)",
         "d": "selective checkpointing (cheap)", "e": "full checkpointing (all)"}


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def functions_for_the_cheap_parts(model):
    """(c): SwiGLU and RMSNorm as autograd Functions that save their inputs and recompute the rest."""
    import torch

    class SwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            s = torch.sigmoid(gate)
            return grad * up * s * (1 + gate * (1 - s)), grad * gate * s

    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, weight, rstd)
            return weight * (x * rstd)

        @staticmethod
        def backward(ctx, grad):
            x, weight, rstd = ctx.saved_tensors
            xhat = x * rstd
            gw = (grad * xhat).reshape(-1, x.shape[-1]).sum(0)
            g = grad * weight
            gx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
            return gx, gw, None

    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.forward = lambda x, m=mlp: m.down_proj(SwiGLU.apply(m.gate_proj(x), m.up_proj(x)))
    for norm in [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]:
        norm.forward = lambda x, n=norm: RMSNorm.apply(x, n.weight, n.variance_epsilon)


def child(case, args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import LOSS
    import RECOMPUTE
    config = AutoConfig.for_model("llama", num_hidden_layers=args.layers, hidden_size=576, intermediate_size=1536,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                  tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert LOSS.chunks_exactly(model, torch.device("cpu")) is None
    scorer = LOSS.Scorer(model, chunked=True)  # what TRAIN.py calls: the loss without the full logits
    if case == "c":
        functions_for_the_cheap_parts(model)
    if case in "de":
        RECOMPUTE.apply(model, {"d": "cheap", "e": "all"}[case])
    call = torch.compile(scorer, dynamic=True) if case == "b" else scorer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 49152, (args.batch, args.length))
    positions = torch.arange(args.length).repeat(args.batch, 1)
    times, losses = [], []
    for _ in range(args.steps):
        t0, before = time.perf_counter(), rss_mb()
        loss = call(ids, positions, ids) / (ids.numel() - args.batch)  # the mean NLL, as the model's own loss
        held = rss_mb() - before
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    print(json.dumps(dict(held=held, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
                          step=statistics.median(times[1:]), losses=losses)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cases", default="a,b,c,d,e")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args)
    import torch
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"SmolLM2-shaped llama, {args.layers} layers, batch {args.batch} x {args.length}, fp32, chunked loss, "
          f"{args.steps} steps a case (median of steps 2-{args.steps})")
    print(f"{'case':<40} {'forward holds MB':>16} {'peak RSS MB':>12} {'step s':>8}   vs (a): held  peak  time   loss")
    base = None
    for case in args.cases.split(","):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        r = subprocess.run([sys.executable, __file__, "--child", case] + sys.argv[1:], capture_output=True,
                           text=True, env=env)
        if r.returncode:
            print(f"{case} {NAMES[case]:<38} failed: {r.stderr.strip().splitlines()[-1]}")
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        base = base or m
        print(f"{case} {NAMES[case]:<38} {m['held']:16.0f} {m['peak']:12.0f} {m['step']:8.2f}   "
              f"{m['held'] / base['held']:10.2f} {m['peak'] / base['peak']:5.2f} {m['step'] / base['step']:5.2f}   "
              f"{m['losses'][-1]:.6f}")


if __name__ == "__main__":
    main()
