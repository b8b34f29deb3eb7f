"""Where a training step's memory goes: the tensors autograd saves for backward, by the line that saved them.

    python bench/activation_memory.py [--batch 2] [--length 1024] [--layers 2]

A SmolLM2-135M-shaped llama (576 wide, 49152-token vocabulary, tied embeddings) with --layers layers, one
forward with labels, fp32, CPU. Parameters are not counted (they are the floor); each storage is counted
once. Printed for the model's own loss and for LOSS.py's chunked loss, with the per-layer share scaled to
SmolLM2's 30 layers: what the chunked loss removes, and what stays (the transformer body, the same in
TRAIN.py and the Trainer).
"""
import argparse
import collections
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def saved_by_line(model, batch):
    """{source line: MB saved for backward} of one forward, parameters excluded."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, by = set(), collections.Counter()

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in params:
            seen.add(key)
            frames = traceback.extract_stack(limit=8)
            f = next((f for f in reversed(frames) if "transformers" in f.filename or "LOSS" in f.filename), None)
            by[f"{os.path.basename(f.filename)}:{f.lineno} {f.line.strip()[:60]}" if f else "?"] += \
                t.untyped_storage().nbytes() / 1e6
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch, use_cache=False)
    return by


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import LOSS
    config = AutoConfig.for_model("llama", num_hidden_layers=args.layers, hidden_size=576, intermediate_size=1536,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.length))
    print(f"SmolLM2-shaped llama, {args.layers} layers, batch {args.batch} x {args.length}, fp32: MB saved for backward")
    for name in ("model's own loss", "chunked loss (LOSS.py)"):
        model = AutoModelForCausalLM.from_config(config)
        if name.startswith("chunked"):
            assert LOSS.use_chunked(model, "cpu") is None
        by = saved_by_line(model, dict(input_ids=ids, labels=ids))
        loss = sum(v for k, v in by.items() if "loss" in k.lower() or "cross_entropy" in k)
        body = sum(by.values()) - loss
        print(f"\n{name}: {sum(by.values()):.0f} MB; the loss {loss:.0f} MB; the body {body:.0f} MB = "
              f"{body / args.layers:.0f} MB a layer -> {30 * body / args.layers / 1e3:.2f} GB for SmolLM2's 30 layers")
        for line, mb in by.most_common(12):
            print(f"  {mb:8.1f}  {line}")


if __name__ == "__main__":
    main()
