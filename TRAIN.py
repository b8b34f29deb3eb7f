"""Train a causal language model: the hand-written loop of LLM-MINI.

    python TRAIN.py                                   # the default experiment in config.yaml
    python TRAIN.py --model DIR --data a.txt b.jsonl --out out --epochs 1 --batch-size 2 --grad-accum 16
    python TRAIN.py --resume auto                     # continue the newest complete checkpoint in --out

Checkpoints go to OUT/ckpt-step-N/ (a save_pretrained directory plus training_state.pt), the final
model to OUT/. Logs and progress go to stderr, metrics to OUT/metrics.jsonl.
"""
import json
import math
import os
import re
import shutil
import signal
import sys
import time

import CONFIG
from CONFIG import UserError

STATE = "training_state.pt"
CONFIG_FILE = "train_config.yaml"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def lr_at(step, t, total_steps):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr_ratio."""
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.learning_rate * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def param_groups(model, weight_decay):
    """Decay matrices (embeddings, linear weights); never biases or norm gains: decided by shape, not name."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def checkpoints(out_dir):
    """Complete checkpoints in out_dir as [(step, path)], oldest first. Incomplete ones never get this name."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = re.fullmatch(r"ckpt-step-(\d+)", name)
        if m and os.path.exists(os.path.join(out_dir, name, STATE)):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def write_model_dir(path, model, tokenizer, cfg, state=None):
    """Write a loadable model directory to a temporary sibling, then rename it into place (atomic)."""
    import torch
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.path.basename(path)}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
            fh.write(CONFIG.dump(cfg))
        if state is not None:
            torch.save(state, os.path.join(tmp, STATE))
        old = path + f".old-{os.getpid()}"
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # OSError from Python, SafetensorError/RuntimeError from the writers' native code
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{path}: could not write the checkpoint ({getattr(e, 'strerror', None) or e}) - free disk space or fix "
                        "permissions; the previous checkpoint is intact")


def save_final(out_dir, model, tokenizer, cfg):
    """The final model goes to OUT/ itself; files are moved in one by one from a complete temporary copy."""
    staging = os.path.join(out_dir, "final")
    write_model_dir(staging, model, tokenizer, cfg)
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)


def prepare_out_dir(cfg):
    """Refuse to start over a previous run unless told to; clear half-written checkpoints of killed runs."""
    out = cfg.output.dir
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith(".tmp-") or ".old-" in name:
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            log(f"removed incomplete checkpoint {os.path.join(out, name)} left by an interrupted run")
    previous = [p for _, p in checkpoints(out)] + [p for p in ("model.safetensors",) if os.path.exists(os.path.join(out, p))]
    if cfg.training.resume is None and previous:
        if not cfg.output.overwrite:
            raise UserError(f"{out}: already holds a training run ({', '.join(os.path.basename(p) for p in previous)})"
                            " - continue it with --resume auto, pick another --out, or pass --overwrite")
        for _, p in checkpoints(out):
            shutil.rmtree(p)
        for name in ("metrics.jsonl",):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        log(f"--overwrite: removed the previous run's checkpoints and metrics in {out}")


def trim_metrics(path, step):
    """Drop metrics logged after the checkpoint we resume from: those steps are about to be run again."""
    if os.path.exists(path):
        with open(path) as fh:
            rows = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as fh:
            fh.writelines(rows)


def resume_path(cfg):
    r, out = cfg.training.resume, cfg.output.dir
    if r is None:
        return None
    if r == "auto":
        found = checkpoints(out)
        if not found:
            raise UserError(f"{out}: no complete checkpoint to resume (--resume auto) - drop --resume to start fresh")
        return found[-1][1]
    if not os.path.exists(os.path.join(r, STATE)):
        raise UserError(f"{r}: not a checkpoint (no {STATE}) - pass a ckpt-step-N directory or --resume auto")
    return r


def load_state(path, optimizer, scaler):
    """Restore optimizer, scaler and RNG from training_state.pt. weights_only=True: tensors and plain data only."""
    import pickle
    import torch
    try:
        state = torch.load(os.path.join(path, STATE), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}/{STATE}: refused to load ({str(e).splitlines()[0][:160]}) - it is corrupt or holds "
                        "objects other than tensors; use another checkpoint")
    try:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            for p in group["params"]:
                s = optimizer.state.get(p, {})
                if "exp_avg" in s and s["exp_avg"].shape != p.shape:
                    raise ValueError(f"optimizer state of shape {tuple(s['exp_avg'].shape)} for a parameter of "
                                     f"shape {tuple(p.shape)}")
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}/{STATE}: does not match the model ({str(e).splitlines()[0][:160]}) - resume with the "
                        "checkpoint's own model directory, or start fresh")
    return state


def setup(cfg):
    """Tokenizer, model and tokenized samples for a fresh or resumed run."""
    import torch
    from DATA import check_files, iter_texts, tokenize
    from MODEL import build_model, check_source, context_length, load_pretrained, pick_device
    from TOKENIZER import load_tokenizer, train_tokenizer
    m, t = cfg.model, cfg.training
    check_files(cfg.data.files)
    device = pick_device(m.device)
    resume = resume_path(cfg)
    if resume:  # the checkpoint holds the model and tokenizer; model.name is only where it started
        tokenizer = load_tokenizer(resume)
        model = load_pretrained(resume, torch.float32, attn_implementation=m.attn_implementation).to(device)
    else:
        if not m.from_scratch:
            check_source(m.name)
        if cfg.tokenizer.name or not m.from_scratch:
            tokenizer = load_tokenizer(cfg.tokenizer.name or m.name, m.trust_remote_code)
        else:
            log(f"training a byte-level BPE tokenizer ({cfg.tokenizer.vocab_size} tokens) on {cfg.data.files}")
            tokenizer = train_tokenizer(iter_texts(cfg.data.files), cfg.tokenizer.vocab_size)
        model = build_model(m, tokenizer, device, t.seed)
    if t.max_length > context_length(model.config):
        raise UserError(f"training.max_length: {t.max_length} is above the model's context of "
                        f"{context_length(model.config)} tokens - lower --max-length")
    samples = tokenize(cfg.data.files, tokenizer, t.max_length)
    return device, tokenizer, model, samples, resume


def train(cfg):
    import torch
    import transformers
    from tqdm import tqdm
    from DATA import collate, count_targets, sample_indices
    from MODEL import pick_dtype
    t, out = cfg.training, cfg.output.dir
    transformers.utils.logging.disable_progress_bar()  # our own bar is the one progress line
    prepare_out_dir(cfg)
    torch.manual_seed(t.seed)
    device, tokenizer, model, samples, resume = setup(cfg)

    # precision: autocast does the low-precision math over fp32 weights; the scaler is a no-op unless fp16
    ptdtype = pick_dtype(cfg.model.dtype, device)
    autocast = torch.autocast(device_type=device, dtype=ptdtype, enabled=ptdtype != torch.float32)
    scaler = torch.amp.GradScaler(device, enabled=ptdtype == torch.float16)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                                  fused=device == "cuda")
    step, position, bad_steps = 0, 0, 0
    if resume:
        state = load_state(resume, optimizer, scaler)
        step, position, bad_steps = state["step"], state["position"], state["bad_steps"]
        log(f"resumed from {resume} at step {step}")
        trim_metrics(os.path.join(out, "metrics.jsonl"), step)

    global_batch = t.batch_size * t.grad_accum
    total_steps = t.max_steps or math.ceil(t.epochs * len(samples) / global_batch)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params / 1e6:.2f}M parameters | {len(samples)} samples | global batch {global_batch} = "
        f"{t.batch_size} x {t.grad_accum} accum | {total_steps} steps | {device} {str(ptdtype)[6:]}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, CONFIG_FILE), "w") as fh:
        fh.write(CONFIG.dump(cfg))
    metrics = open(os.path.join(out, "metrics.jsonl"), "a")

    def checkpoint(step):
        state = {"step": step, "position": position, "bad_steps": bad_steps, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        path = os.path.join(out, f"ckpt-step-{step}")
        write_model_dir(path, model, tokenizer, cfg, state)
        for _, old in checkpoints(out)[:-t.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    # Ctrl-C / SIGTERM: finish the step, checkpoint, exit. A second signal exits at once; checkpoints are
    # renamed into place only when complete, so that never leaves a broken newest checkpoint.
    stop = []

    def on_signal(signum, frame):
        if stop:
            os._exit(128 + signum)
        stop.append(signum)
        log(f"\n{signal.Signals(signum).name}: stopping after this step (again to quit at once)")
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    model.train()
    bar = tqdm(total=total_steps, initial=step, file=sys.stderr, dynamic_ncols=True, disable=None)
    t0, tokens, loss_sum, logged = time.perf_counter(), 0, torch.zeros((), device=device), 0
    while step < total_steps:
        lr = lr_at(step, t, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = sample_indices(position, global_batch, len(samples), t.seed)
        micro = [collate([samples[i] for i in idx[k:k + t.batch_size]], tokenizer.pad_token_id)
                 for k in range(0, global_batch, t.batch_size)]
        # normalise by the target tokens of the whole accumulated batch, so accumulation == one big batch
        n_targets = torch.tensor(sum(count_targets(b) for b in micro), device=device)
        tokens += sum(int(b["attention_mask"].sum()) for b in micro)  # CPU tensors: no device sync
        for batch in micro:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                loss = model(**batch, num_items_in_batch=n_targets).loss  # sum of token NLL / n_targets
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        finite = bool(torch.isfinite(norm))  # one host sync per optimizer step, never per micro-step
        if finite or scaler.is_enabled():  # the fp16 scaler skips non-finite steps itself and lowers its scale
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        bad_steps = 0 if finite or scaler.is_enabled() else bad_steps + 1
        step, position, logged = step + 1, position + global_batch, logged + 1
        bar.update(1)

        last = step == total_steps or stop or bad_steps >= t.max_bad_steps
        if step % t.log_every == 0 or last:
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss_sum.item() / logged, "lr": lr,
                   "grad_norm": norm.item(), "tokens_per_s": tokens / dt, "skipped_steps": bad_steps}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if bar.disable:  # no terminal (a log file, CI): a plain line instead of the progress bar
                log(f"step {step}/{total_steps} loss {row['loss']:.4f} lr {lr:.2e} {row['tokens_per_s']:.0f} tok/s")
            t0, tokens, loss_sum, logged = time.perf_counter(), 0, torch.zeros((), device=device), 0
        if bad_steps >= t.max_bad_steps:
            path = checkpoint(step)
            raise UserError(f"{bad_steps} optimizer steps in a row had non-finite gradients and were skipped; the "
                            f"last good weights are in {path} - lower --learning-rate or use --dtype float32")
        if (t.save_every and step % t.save_every == 0) or last:
            path = checkpoint(step)
            if stop:
                log(f"checkpoint written to {path}\nresume with: python TRAIN.py {' '.join(sys.argv[1:])} "
                    f"--resume auto")
                sys.exit(128 + stop[0])
    bar.close()
    metrics.close()
    save_final(out, model, tokenizer, cfg)
    try:
        from EVAL import plot_metrics
        log(f"loss curve: {plot_metrics(out)}")
    except UserError as e:  # matplotlib is optional
        log(f"no loss curve: {e}")
    log(f"done: model in {out}/ - try: python INFER.py --model {out} --prompt \"...\"")


def main(argv):
    cfg, _, _ = CONFIG.load(argv, description=__doc__)
    train(cfg)


if __name__ == "__main__":
    CONFIG.main_guard(main)
