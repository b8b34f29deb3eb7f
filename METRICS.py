"""The run's log: its first lines, OUT/metrics.jsonl (one JSON row per log step and per validation), the
progress bar's postfix, and a plain line per log step where stderr is not a terminal. TRAIN.py calls these;
only rank 0 writes (metrics is None on the other ranks)."""
import json
import math
import os
import sys
import time

import CONFIG
from CHECKPOINT import CONFIG_FILE, trim_metrics
from CONFIG import log


def start_log(cfg, raw_model, data, global_batch, total_steps, device, ptdtype, world, resume, progress, master):
    """The run's first log lines, its resolved config in OUT, and OUT/metrics.jsonl (open for appending on rank 0)."""
    from LOSS import active as chunked_loss_active
    t, out = cfg.training, cfg.output.dir
    n_params = sum(p.numel() for p in raw_model.parameters())
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    on = [name for name, flag in (("gradient checkpointing", raw_model.is_gradient_checkpointing),
                                  ("chunked loss", chunked_loss_active(raw_model)), ("torch.compile", t.compile),
                                  ("FSDP", t.fsdp)) if flag]
    log(f"{n_params / 1e6:.2f}M parameters ({n_train / 1e6:.3f}M trainable) | {len(data)} sequences | "
        f"global batch {global_batch} = {t.batch_size} x {t.grad_accum} accum x {world} ranks | {total_steps} steps "
        f"({CONFIG.warmup_of(t.warmup_steps, total_steps)} warmup) at peak lr {t.learning_rate:g} | "
        f"{device} {str(ptdtype)[6:]}" + "".join(f" | {name} on" for name in on))
    if resume:
        log(f"resumed from {resume} at step {progress.step}")
    if not master:
        return None
    if resume:
        trim_metrics(os.path.join(out, "metrics.jsonl"), progress.step)
    with open(os.path.join(out, CONFIG_FILE), "w") as fh:
        fh.write(CONFIG.dump(cfg))
    return open(os.path.join(out, "metrics.jsonl"), "a")


def new_window(device):
    """What is summed between two log lines: start time, loss (a device tensor: no sync per step), tokens, steps."""
    import torch
    return {"t0": time.perf_counter(), "loss": torch.zeros((), device=device), "tokens": 0, "steps": 0}


def tally(window, loss, tokens):
    window["loss"], window["tokens"], window["steps"] = window["loss"] + loss, window["tokens"] + tokens, window["steps"] + 1


def write_row(metrics, row):
    if metrics:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()


def log_row(metrics, bar, window, progress, lr, norm, total_steps, world, device, master):
    """One metrics row: the mean token loss, lr, gradient norm and tokens/s since the last one (collective)."""
    import torch
    import torch.distributed as dist
    if world > 1:
        dist.all_reduce(window["loss"])  # each rank holds its share of the mean token loss
    row = {"step": progress.step, "loss": window["loss"].item() / window["steps"] / world, "lr": lr,
           "grad_norm": norm.item(), "tokens_per_s": window["tokens"] / (time.perf_counter() - window["t0"]),
           "skipped_steps": progress.bad_steps}
    if "cuda" in str(device):  # peak GPU memory so far, against params + grads + AdamW state
        row["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    write_row(metrics, row)
    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    if bar.disable and master:  # no terminal (a log file, CI): a plain line instead of the progress bar
        log(f"step {progress.step}/{total_steps} loss {row['loss']:.4f} lr {lr:.2e} {row['tokens_per_s']:.0f} tok/s")


def log_validation(metrics, bar, step, val_loss, n_sequences, share):
    row = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "val_sequences": n_sequences,
           "val_share": share}
    write_row(metrics, row)
    if metrics:
        bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {row['val_ppl']:.2f} ({n_sequences} "
                  f"sequences; validation is {share:.0%} of the wall time so far)", file=sys.stderr)
