"""The run's log: its first line, the progress bar on stderr (a plain line per log step where stderr is not a
terminal), and OUT/metrics.jsonl, one JSON row per log step and per validation, written by rank 0 only."""
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import CONFIG
import TRACKERS
from REPORT import UserError, log, need


@dataclasses.dataclass
class Window:
    """What is summed between two log lines: the loss and the objective's statistics (Log.names; a device tensor,
    so no host sync per step), the tokens, the steps and the seconds spent preparing their batches (GRPO:
    generating and rewarding) and training on them (validation and checkpoints are not counted)."""
    sums: torch.Tensor  # (len(Log.names),)
    tokens: int = 0
    steps: int = 0
    prepare_seconds: float = 0.0
    train_seconds: float = 0.0


@dataclasses.dataclass
class Log:
    """Where the run's log goes, what it sums until the next row, and the wall time spent validating."""
    bar: tqdm
    metrics: object            # OUT/metrics.jsonl open for appending, or None on ranks other than 0
    window: Window
    started: float             # time.perf_counter() at the start
    names: tuple = ("loss",)   # what Window.sums holds: the loss, then the objective's (DPO's rewards/…)
    val_seconds: float = 0.0
    trackers: list = dataclasses.field(default_factory=list)  # TRACKERS.open_all: they receive each row too
    out: str = ""


def summary(cfg, run, scorer, data, total_steps):
    """The run's first log line: model size, data ("N sequences"), batch, schedule, device and precision, what
    is on."""
    t, model = cfg.training, scorer.model
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    recomputing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # transformers' flag
    on = [name for name, flag in (("recompute", recomputing),
                                  ("chunked loss", scorer.chunked), ("torch.compile", t.compile),
                                  ("FSDP", t.fsdp)) if flag]
    return (f"{n_params / 1e6:.2f}M parameters ({n_train / 1e6:.3f}M trainable) | {data} | global "
            f"batch {t.batch_size * t.grad_accum * run.world} = {t.batch_size} x {t.grad_accum} accum x {run.world} "
            f"ranks | {total_steps} steps ({CONFIG.warmup_of(t.warmup_steps, total_steps)} warmup) at peak lr "
            f"{t.learning_rate:g} | {run.device.type} {str(run.dtype).removeprefix('torch.')}"
            + "".join(f" | {name} on" for name in on))


def open_log(run, total_steps, step, metrics_file, stat_names, *, trackers=(), out=""):
    """The run's Log from `step` of total_steps, summing the loss and the objective's statistics (stat_names),
    writing rows to metrics_file (CHECKPOINT.open_metrics; None on ranks other than 0) and to the trackers
    (TRACKERS.open_all, whose state is kept in the output folder `out`)."""
    names = ("loss",) + tuple(stat_names)
    bar = tqdm(total=total_steps, initial=step, file=sys.stderr, dynamic_ncols=True,
               disable=None if run.master else True)  # None: off where stderr is not a terminal
    return Log(bar, metrics_file, Window(torch.zeros(len(names), device=run.device)), time.perf_counter(), names=names,
               trackers=list(trackers), out=out)


def tally(run_log, sums, tokens, prepare_seconds, train_seconds):
    """One optimizer step done: its loss and statistics (Log.names), tokens and seconds (preparing its batch,
    training on it) go into the window, and the bar moves on."""
    w = run_log.window
    w.sums, w.tokens, w.steps = w.sums + sums, w.tokens + tokens, w.steps + 1
    w.prepare_seconds, w.train_seconds = w.prepare_seconds + prepare_seconds, w.train_seconds + train_seconds
    run_log.bar.update(1)


def write_row(run_log, row, samples=()):
    if run_log.metrics:
        run_log.metrics.write(json.dumps(row) + "\n")
        run_log.metrics.flush()
    TRACKERS.send(run_log.trackers, run_log.out, row, samples)


def log_step(run_log, run, progress, lr, norm):
    """One metrics row: the mean loss (and statistics), lr, gradient norm and tokens/s since the last one
    (collective)."""
    window = run_log.window
    run_log.window = Window(torch.zeros(len(run_log.names), device=run.device))
    if run.world > 1:
        dist.all_reduce(window.sums)  # each rank holds its share of the means
    means = (window.sums / window.steps / run.world).tolist()
    seconds = window.prepare_seconds + window.train_seconds
    row = {"step": progress.step, **dict(zip(run_log.names, means)), "lr": lr, "grad_norm": norm.item(),
           "tokens_per_s": window.tokens / max(seconds, 1e-9), "prepare_s": window.prepare_seconds / window.steps,
           "train_s": window.train_seconds / window.steps, "skipped_steps": progress.bad_steps}
    if run.device.type == "cuda":  # peak GPU memory so far, against params + grads + AdamW state
        row["max_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 1e9
    write_row(run_log, row)
    shown = {short: f"{row[name]:.3f}" for name, short in (("rewards/accuracies", "acc"), ("reward", "reward"))
             if name in row}
    run_log.bar.set_postfix(loss=f"{row['loss']:.3f}", **shown, lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    if run_log.bar.disable and run.master:  # no terminal (a log file, CI): a plain line instead of the bar
        log(f"step {progress.step}/{run_log.bar.total} loss {row['loss']:.4f}"
            + "".join(f" {k} {row[k]:.3f}" for k in run_log.names[1:])
            + f" lr {lr:.2e} {row['tokens_per_s']:.0f} tok/s")


def log_validation(run_log, step, val_loss, n_sequences, seconds, samples=()):
    """One validation row, and its samples for the trackers (EVAL.samples); `seconds` it took, added to the share
    of the run's wall time spent validating."""
    run_log.val_seconds += seconds
    share = run_log.val_seconds / (time.perf_counter() - run_log.started)
    row = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "val_sequences": n_sequences,
           "val_share": share}
    write_row(run_log, row, samples)
    if run_log.metrics:
        run_log.bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {row['val_ppl']:.2f} "
                          f"({n_sequences} sequences; validation is {share:.0%} of the wall time so far)", file=sys.stderr)


def log_tasks(run_log, step, scores, seconds):
    """One row of benchmark scores (rank 0's; the other ranks have none), as tasks/TASK/METRIC."""
    if run_log.metrics:
        write_row(run_log, {"step": step, **{f"tasks/{k}": v for k, v in scores.items()}, "tasks_s": seconds})
        run_log.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                          + f" ({seconds:.1f} s)", file=sys.stderr)


def close(run_log):
    """The end of the log: the bar closed, metrics.jsonl closed and drawn (OUT/loss.png, where matplotlib is
    installed: EVAL.py --plot says what to install), the trackers finished with that picture."""
    run_log.bar.close()
    curve = None
    if run_log.metrics:
        run_log.metrics.close()
        if importlib.util.find_spec("matplotlib"):
            curve = plot_metrics(run_log.out)
            log(f"curve: {curve}")
    TRACKERS.close_all(run_log.trackers, curve)


def plot_metrics(out_dir):
    """out_dir/loss.png: training loss (and validation loss when logged) and learning rate over steps; for a
    GRPO run out_dir/reward.png: the mean reward (and each reward function's) instead of the loss."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{path}: no metrics to plot - pass the --out directory of a training run")
    need("matplotlib", "the loss plot").use("Agg")
    import matplotlib.pyplot as plt  # optional: only the plot needs it
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rewarded = any("reward" in r for r in rows)
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    curves = sorted({k for r in rows for k in r if k == "reward" or k.startswith("rewards/") and k.endswith("/mean")})
    for name in curves if rewarded else ["loss"]:
        ax.plot([r["step"] for r in rows if name in r], [r[name] for r in rows if name in r],
                label=name if rewarded else "train loss", linewidth=2 if name in ("reward", "loss") else 1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_ylabel("mean reward" if rewarded else "loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in rows if "lr" in r], [r["lr"] for r in rows if "lr" in r], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    out = os.path.join(out_dir, "reward.png" if rewarded else "loss.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

