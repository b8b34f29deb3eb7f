"""What keeping packed documents apart costs: forward + backward of the same packed blocks with restarting
position ids (transformers builds a block-diagonal causal mask, so no document sees another) against the
same blocks with one running position (plain causal attention, documents see the ones before them).

    python bench/packing_cost.py [--block 256] [--batch 8] [--steps 10] [--repeats 5] [--attn sdpa]

Baseline: the plain causal run, measured in the same process, interleaved; median of --repeats runs of
--steps steps each. A from-scratch GPT-2 (6 layers, 384 wide) on data/, with a 4096-token BPE of data/.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attn", default="sdpa")
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from BATCHES import collate, gather, sequences
    from DATA import iter_texts, local, token_cache
    from MODEL import no_padding_warning
    from TOKENIZER import train_tokenizer
    no_padding_warning()
    files = ["tests/data/train.txt", "tests/data/train.jsonl"]
    tok = train_tokenizer(iter_texts(local(files)), 4096)
    corpus = token_cache(local(files), tok, tempfile.mkdtemp(prefix="llm-mini-packing-"))
    seqs = sequences(corpus, 0, len(corpus.ends), args.block, packing=True)
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", n_layer=6, n_head=6, n_embd=384, n_positions=args.block, vocab_size=len(tok))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn)
    model.loss_type = "ForCausalLM"
    batches = [collate(gather(seqs, range(i, i + args.batch)), tok.pad_token_id)
               for i in range(0, len(seqs) - args.batch, args.batch)][:args.steps]
    running = [{**b, "position_ids": torch.arange(b["input_ids"].shape[1]).repeat(len(b["input_ids"]), 1)}
               for b in batches]

    def run(bs):
        t = time.perf_counter()
        for b in bs:
            model(**b, use_cache=False).loss.backward()
        return time.perf_counter() - t
    run(batches[:2]), run(running[:2])  # warm up
    apart, crossing = [], []
    for _ in range(args.repeats):
        apart.append(run(batches))
        crossing.append(run(running))
    n_tokens = int(seqs.lengths[:len(batches) * args.batch].sum())
    docs = sum(int(seqs.offsets[i + 1] - seqs.offsets[i]) for i in range(len(batches) * args.batch))
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, attention {args.attn}: "
          f"{len(batches)} steps of {args.batch} x <= {args.block} tokens, {docs / len(batches) / args.batch:.1f} "
          f"documents per block; median of {args.repeats}")
    a, c = statistics.median(apart), statistics.median(crossing)
    print(f"documents apart (block-diagonal) {n_tokens / a:8.0f} tok/s")
    print(f"documents crossing (plain causal) {n_tokens / c:7.0f} tok/s   (baseline)")
    print(f"ratio apart / crossing: {c / a:.3f} of the baseline's speed")


if __name__ == "__main__":
    main()
