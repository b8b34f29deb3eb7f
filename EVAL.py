"""Measure a model on text: perplexity, NLL per token, bits per byte; per-token dumps; the training plot;
and validate(), the exact validation loss TRAIN.py logs during training.

    python EVAL.py --model out --data data/train.txt               # perplexity over the whole data
    python EVAL.py --model out --data long.txt --window 512 --stride 256   # sliding window for long texts
    python EVAL.py --model out --data a.jsonl --dump tokens.jsonl --dump-top-k 5
    python EVAL.py --plot out                                      # out/loss.png from out/metrics.jsonl

Each document (a .txt line or a .jsonl "text") is scored as TRAIN.py trains it: its tokens plus EOS.
Every token but the first of each document is scored exactly once; perplexity is
exp(sum of NLL / number of scored tokens) over all the data, not a mean of batch means.
"""
import json
import math
import os
import sys

import CONFIG
from CONFIG import UserError


def windows(n, window, stride):
    """Sliding windows over a document of n tokens, as the Hugging Face perplexity guide does it:
    [(begin, end, n_scored)]: score the last n_scored tokens of ids[begin:end]; each token once."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def score(model, batch, device):
    """Log-probabilities of every next token for a list of (ids, n_scored): [(target ids, logprobs)]."""
    import torch
    T = max(len(ids) for ids, _ in batch)
    input_ids = torch.zeros((len(batch), T), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids), 1
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).cpu()  # (B, T-1, V): position t predicts token t+1
    out = []
    for row, (ids, n_scored) in enumerate(batch):
        first = max(1, len(ids) - n_scored)  # token 0 of a document has no context to be predicted from
        targets = input_ids[row, first:len(ids)]
        out.append((targets, logprobs[row, first - 1:len(ids) - 1]))
    return out


def evaluate(model, tokenizer, texts, window, stride, batch_size, device, on_document=None):
    """Sum of NLL, scored tokens and UTF-8 bytes over all texts; memory is bounded by one batch of windows."""
    nll, tokens, n_bytes, pending = 0.0, 0, 0, []  # pending: (doc index, ids slice, n_scored)

    def flush():
        nonlocal nll, tokens
        doc_parts = {}
        for (doc, _, _), (targets, lp) in zip(pending, score(model, [(p[1], p[2]) for p in pending], device)):
            picked = lp.gather(1, targets[:, None])[:, 0]
            nll -= float(picked.double().sum())
            tokens += len(targets)
            if on_document:
                doc_parts.setdefault(doc, []).append((targets, lp, picked))
        if on_document:
            for doc, parts in doc_parts.items():
                on_document(doc, parts)
        pending.clear()

    for doc, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        ids = ids + [tokenizer.eos_token_id] if not ids or ids[-1] != tokenizer.eos_token_id else ids
        n_bytes += len(text.encode("utf-8"))
        for begin, end, n_scored in windows(len(ids), window, stride):
            pending.append((doc, ids[begin:end], n_scored))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return nll, tokens, n_bytes


def validate(model, tokens, spans, batch_size, pad_id, device, autocast, rank, world):
    """Validation loss exp-able to perplexity: Σ NLL / Σ target tokens over the whole set (not a mean of
    batch means), in float64. Ranks score disjoint batches and sum; every rank runs the same number of
    forward passes (FSDP gathers parameters in each), an empty share scoring a dummy with weight 0."""
    import torch
    import torch.distributed as dist
    from DATA import collate, count_targets, gather
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (Σ NLL, Σ targets)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(spans), batch_size * world):
            mine = list(range(start + rank * batch_size, min(start + (rank + 1) * batch_size, len(spans))))
            batch = collate(gather(tokens, spans, mine or [0]), pad_id)
            n = count_targets(batch) if mine else 0
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:  # num_items_in_batch=1: the loss is the sum of the token NLLs
                nll = model(**batch, num_items_in_batch=torch.tensor(1, device=device)).loss
            sums += torch.stack([nll.double() * bool(mine), torch.tensor(n, dtype=torch.float64, device=device)])
    model.train()
    if world > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def dumper(path, top_k):
    """A per-document callback writing token ids and log-probabilities (JSONL streams; .npy is kept in memory)."""
    if path.endswith(".npy"):
        import numpy as np
        chunks = []
        return (lambda doc, parts: chunks.extend(p[2].numpy() for p in parts)), (
            lambda: np.save(path, np.concatenate(chunks).astype("float32") if chunks else np.zeros(0, "float32")))
    if not path.endswith(".jsonl"):
        raise UserError(f"eval.dump: {path} - use a .jsonl or .npy file name")
    fh = open(path, "w")
    last = {}

    def write(doc, parts):
        rec = last.get(doc) or {"doc": doc, "tokens": [], "logprobs": [], **({"top_k": []} if top_k else {})}
        for targets, lp, picked in parts:
            rec["tokens"] += targets.tolist()
            rec["logprobs"] += [round(x, 6) for x in picked.tolist()]
            if top_k:
                vals, idx = lp.topk(top_k, dim=-1)
                rec["top_k"] += [[[i, round(v, 6)] for i, v in zip(ii, vv)] for ii, vv in zip(idx.tolist(), vals.tolist())]
        for d in [d for d in last if d != doc]:  # documents arrive in order: earlier ones are complete
            fh.write(json.dumps(last.pop(d)) + "\n")
        last[doc] = rec

    def close():
        for rec in last.values():
            fh.write(json.dumps(rec) + "\n")
        fh.close()
    return write, close


def plot_metrics(out_dir):
    """out_dir/loss.png: training loss (and validation loss when logged) and learning rate over steps."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{path}: no metrics to plot - pass the --out directory of a training run")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the loss plot needs matplotlib - pip install matplotlib")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r], label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in rows if "lr" in r], [r["lr"] for r in rows if "lr" in r], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=100)
    plt.close(fig)
    return os.path.join(out_dir, "loss.png")


def main(argv):
    cfg, flags, _ = CONFIG.load(argv, CONFIG.EVAL_SECTIONS, description=__doc__, config_default=None)
    e = cfg.eval
    if e.plot:
        print(f"wrote {plot_metrics(e.plot)}", file=sys.stderr)
        return
    if "model.name" not in flags or "data.files" not in flags:
        raise UserError("--model and --data are required: e.g. python EVAL.py --model out --data data/train.txt")
    from DATA import check_files, iter_texts
    check_files(cfg.data.files)

    import torch
    from MODEL import DTYPES, context_length, load_pretrained, pick_device
    from TOKENIZER import load_tokenizer
    device = pick_device(cfg.model.device)
    dtype = {"auto": torch.float32, **DTYPES}[cfg.model.dtype]
    model = load_pretrained(cfg.model.name, dtype, base_model=cfg.model.base_model,
                            attn_implementation=cfg.model.attn_implementation,
                            trust_remote_code=cfg.model.trust_remote_code).to(device).eval()
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    window = e.window or context_length(model.config)
    if window > context_length(model.config):
        raise UserError(f"eval.window: {window} is above the model's context of {context_length(model.config)}")
    stride = e.stride or window
    if stride > window:
        raise UserError(f"eval.stride: {stride} is above the window of {window} tokens - tokens would go unscored")
    on_doc, close = dumper(e.dump, e.dump_top_k) if e.dump else (None, None)
    nll, tokens, n_bytes = evaluate(model, tokenizer, iter_texts(cfg.data.files), window, stride, e.batch_size,
                                    device, on_doc)
    if close:
        close()
    print(f"perplexity     {math.exp(nll / tokens):.4f}")
    print(f"nll_per_token  {nll / tokens:.6f}")
    print(f"bits_per_byte  {nll / math.log(2) / n_bytes:.6f}")
    print(f"tokens         {tokens}")
    print(f"bytes          {n_bytes}")


if __name__ == "__main__":
    CONFIG.main_guard(main)
