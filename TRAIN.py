"""Train a causal language model: the hand-written loop of LLM-MINI.

    python TRAIN.py                                   # the default experiment in config.yaml
    python TRAIN.py --model DIR --data a.txt b.jsonl --out out --epochs 1 --batch-size 2 --grad-accum 16
    python TRAIN.py --resume auto                     # continue the newest complete checkpoint in --out

Checkpoints go to OUT/ckpt-step-N/ (a save_pretrained directory plus training_state.pt), the final
model to OUT/. Logs and progress go to stderr, metrics to OUT/metrics.jsonl.
"""
import math
import os
import signal
import sys
import time

import CONFIG
from CHECKPOINT import (Progress, changed_settings, full_state, load_state, prepare_out_dir, resume_path,
                        save_final, write_model_dir)
from CHECKPOINT import save as save_checkpoint
from CONFIG import UserError, log
from DISTRIBUTED import agreed_max, barrier, check_fsdp, compile_report, init_distributed, shutdown, wrap
from EVAL import validate
from METRICS import log_row, log_validation, new_window, start_log, tally


def lr_at(step, t, total_steps):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr_ratio."""
    warmup = CONFIG.warmup_of(t.warmup_steps, total_steps)
    if step < warmup:
        return t.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.learning_rate * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def param_groups(model, weight_decay):
    """Decay matrices (embeddings, linear weights); never biases or norm gains: decided by shape, not name."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def setup(cfg, rank, world, local_rank):
    """Device, tokenizer, model, tokenized data (train, validation, the validation subset) and the checkpoint
    to resume, for a fresh or resumed run. Rank 0 writes the caches first; the other ranks then read them."""
    from CHAT import with_template
    from DATA import check_files, check_loss_on, evenly_spaced, load
    from MODEL import (build_model, check_source, context_length, fuse_activations, keeps_documents_apart,
                       load_pretrained, pick_device, quantization)
    from TOKENIZER import cached_bpe, load_tokenizer

    def rank0_first(fn):
        result = fn() if rank == 0 else None
        barrier(world)
        return result if rank == 0 else fn()
    m, t = cfg.model, cfg.training
    check_files(cfg.data.files + cfg.data.val_files)
    chat = "messages" in check_loss_on(cfg.data.files + cfg.data.val_files, cfg.data.loss_on).values()
    device = pick_device(m.device)
    device = f"cuda:{local_rank}" if device == "cuda" and world > 1 else device
    resume = resume_path(cfg)
    if resume:  # the checkpoint holds the model and tokenizer; model.name is only where it started
        tokenizer = load_tokenizer(resume)
        model = load_pretrained(resume, "float32", trainable=True, attn_implementation=m.attn_implementation,
                                quantization_config=quantization(cfg.lora, device))  # an adapter brings its base
    else:
        if not m.from_scratch:
            check_source(m.name)
        if cfg.tokenizer.name or not m.from_scratch:
            tokenizer = load_tokenizer(cfg.tokenizer.name or m.name, m.trust_remote_code)
        else:
            tokenizer = rank0_first(lambda: cached_bpe(cfg.data.files, cfg.tokenizer.vocab_size, cfg.data.cache_dir,
                                                       chat))
        if chat and not tokenizer.chat_template:
            log("the tokenizer has no chat template: conversations are rendered with the default ChatML one "
                "(README: Conversations), saved with the model for INFER.py --chat")
            with_template(tokenizer)
        model = build_model(m, cfg.lora, tokenizer, device, t.seed)
    model = model if getattr(model, "hf_quantizer", None) else model.to(device)  # a 4-bit base is on its GPU already
    fuse_activations(model)
    context = context_length(model.config)
    if t.max_length is None:
        t.max_length = CONFIG.default_max_length(context)
        log(f"max_length {t.max_length}: the model's context of {context} tokens"
            + (f", capped at {CONFIG.MAX_LENGTH_CAP} (--max-length to change)" if context > t.max_length else ""))
    if t.max_length > context:
        raise UserError(f"training.max_length: {t.max_length} is above the model's context of "
                        f"{context} tokens - lower --max-length")
    if resume and changed_settings(resume, cfg):
        log(f"note: resuming with settings that differ from the checkpoint's: {'; '.join(changed_settings(resume, cfg))}")
    if cfg.data.packing and not keeps_documents_apart(model, device):
        raise UserError(f"data.packing: {model.config.model_type} lets packed documents attend to each other (it "
                        "ignores restarting position ids) - use --no-packing")
    train, val = rank0_first(lambda: load(cfg.data, tokenizer, t.max_length))
    val_indices = evenly_spaced(len(val), t.eval_batches * t.batch_size) if val else []
    if val and len(val_indices) < len(val):
        log(f"validation scores the same {len(val_indices)} of its {len(val)} sequences each time "
            f"(training.eval_batches {t.eval_batches} x batch_size {t.batch_size}); EVAL.py scores all")
    return device, tokenizer, model, (train, val, val_indices), resume


def micro_batches(data, idx, batch_size, grad_accum, world, rank, pad_id):
    """This rank's share of each micro-step of one optimizer step: the global batch idx (the same list on every
    rank) is cut into grad_accum micro-steps of world x batch_size sequences."""
    from DATA import collate, gather
    return [collate(gather(data, idx[(m * world + rank) * batch_size:][:batch_size]), pad_id) for m in range(grad_accum)]


def optimizer_step(model, raw_model, micro, n_targets, optimizer, scaler, autocast, sync_grads, grad_clip, world):
    """Forward and backward over the micro-batches, clip, step. Each micro-batch's loss is its token NLL sum
    over n_targets, the target tokens of the whole global batch, so accumulation and ranks equal one big batch
    (DDP averages gradients over ranks: n_targets is divided by world for that). -> (loss, grad norm, finite)"""
    import torch
    device, loss_sum = next(raw_model.parameters()).device, 0.0
    for m, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if world > 1:
            sync_grads(m == len(micro) - 1)  # all-reduce once, on the last micro-step
        with autocast:
            loss = model(**batch, num_items_in_batch=torch.tensor(n_targets / world, device=device), use_cache=False).loss
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    finite = bool(torch.isfinite(norm))  # one host sync per optimizer step; equal on all ranks (synced grads)
    if finite or scaler.is_enabled():  # the fp16 scaler skips non-finite steps itself and lowers its scale
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm, finite or scaler.is_enabled()


def due(step, every, last):
    """Whether something done every N steps (0: never) happens at this step; everything happens at the last."""
    return bool(last or (every and step % every == 0))


def stop_signals(world, device):
    """Ctrl-C / SIGTERM: finish the step, checkpoint, exit; a second signal exits at once (checkpoints are
    renamed into place only when complete, so that never leaves a broken one). -> stop(): the signal to stop
    on, agreed by all ranks (or the others would hang in the next all-reduce), or 0."""
    caught = []

    def on_signal(signum, frame):
        if caught:
            os._exit(128 + signum)
        caught.append(signum)
        log(f"\n{signal.Signals(signum).name}: stopping after this step (again to quit at once)")
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return lambda: agreed_max(caught[0] if caught else 0, world, device)


def seed_and_determinism(seed, deterministic):
    import torch
    torch.manual_seed(seed)
    if deterministic:  # cuBLAS needs a fixed workspace for repeatable matmuls (set before its first use)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def train(cfg):
    import torch
    from tqdm import tqdm
    from DATA import sample_indices
    from LOSS import use as use_chunked_loss
    from MODEL import no_padding_warning, pick_dtype
    from transformers.utils import logging
    logging.disable_progress_bar()  # our own bar is the one progress line
    no_padding_warning()
    t, out = cfg.training, cfg.output.dir
    rank, world, local_rank = init_distributed()
    master = rank == 0  # only rank 0 logs, writes metrics and checkpoints
    check_fsdp(t.fsdp, cfg.lora.enabled or cfg.lora.qlora, world)
    if master:
        prepare_out_dir(cfg)
    barrier(world)
    seed_and_determinism(t.seed, t.deterministic)
    device, tokenizer, raw_model, (data, val, val_idx), resume = setup(cfg, rank, world, local_rank)
    if t.chunked_loss:  # before wrapping, so that DDP, FSDP and compile see the swap
        use_chunked_loss(raw_model, device)
    model, sync_grads = wrap(raw_model, t, world, local_rank, device)
    # precision: autocast does the low-precision math over fp32 weights; the scaler is a no-op unless fp16
    kind = device.split(":")[0]
    ptdtype = pick_dtype(cfg.model.dtype, kind, "train")
    autocast = torch.autocast(device_type=kind, dtype=ptdtype, enabled=ptdtype != torch.float32)
    scaler = torch.amp.GradScaler(kind, enabled=ptdtype == torch.float16)
    optimizer = torch.optim.AdamW(param_groups(raw_model, t.weight_decay), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                                  fused=kind in ("cuda", "cpu"))  # one kernel for all parameters, no temporaries
    if resume:
        progress = load_state(resume, optimizer, scaler, rank, world, raw_model if t.fsdp else None)
    else:
        progress = Progress()
        torch.manual_seed(t.seed + rank)  # dropout masks differ between ranks
    global_batch = t.batch_size * t.grad_accum * world
    total_steps = t.max_steps or math.ceil(t.epochs * len(data) / global_batch)
    metrics = start_log(cfg, raw_model, data, global_batch, total_steps, device, ptdtype, world, resume, progress, master)

    def save(name):
        return save_checkpoint(out, name, raw_model, tokenizer, cfg, progress, optimizer, scaler, device, t.fsdp,
                               rank, world, t.keep_last)
    stop = stop_signals(world, device)
    bar = tqdm(total=total_steps, initial=progress.step, file=sys.stderr, dynamic_ncols=True, disable=None if master else True)
    window, run_start, val_time = new_window(device), time.perf_counter(), 0.0
    model.train()
    while progress.step < total_steps:
        lr = lr_at(progress.step, t, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = sample_indices(progress.position, global_batch, len(data), t.seed)  # the global batch, same on all ranks
        micro = micro_batches(data, idx, t.batch_size, t.grad_accum, world, rank, tokenizer.pad_token_id)
        loss, norm, ok = optimizer_step(model, raw_model, micro, max(1, int(data.targets[idx].sum())), optimizer,
                                        scaler, autocast, sync_grads, t.grad_clip, world)
        progress.step, progress.position = progress.step + 1, progress.position + global_batch
        progress.bad_steps = 0 if ok else progress.bad_steps + 1
        tally(window, loss, int(data.lengths[idx].sum()))
        bar.update(1)
        signum = stop()
        last = progress.step == total_steps or signum or progress.bad_steps >= t.max_bad_steps
        if due(progress.step, t.log_every, last):
            log_row(metrics, bar, window, progress, lr, norm, total_steps, world, device, master)
            window = new_window(device)
        if val and due(progress.step, t.eval_every, last):
            v0 = time.perf_counter()
            val_loss = validate(raw_model if world > 1 and not t.fsdp else model, val, val_idx, t.batch_size,
                                tokenizer.pad_token_id, device, autocast, rank, world)
            val_time, window["t0"] = val_time + time.perf_counter() - v0, window["t0"] + time.perf_counter() - v0
            log_validation(metrics, bar, progress.step, val_loss, len(val_idx), val_time / (time.perf_counter() - run_start))
            if t.save_best and val_loss < progress.best_val:
                progress.best_val = val_loss
                save("ckpt-best")
        if progress.bad_steps >= t.max_bad_steps:
            raise UserError(f"{progress.bad_steps} optimizer steps in a row had non-finite gradients and were skipped; "
                            f"the last good weights are in {save(f'ckpt-step-{progress.step}')} - lower "
                            "--learning-rate or use --dtype float32")
        if due(progress.step, t.save_every, last):
            path = save(f"ckpt-step-{progress.step}")
            if signum:
                log(f"checkpoint written to {path}\nresume with: python TRAIN.py {' '.join(sys.argv[1:])} --resume auto")
                sys.exit(128 + signum)
    bar.close()
    if t.compile:
        log(compile_report())
    finish(cfg, raw_model, tokenizer, optimizer, metrics, t.fsdp, master, world)


def finish(cfg, raw_model, tokenizer, optimizer, metrics, fsdp, master, world):
    """The final model in OUT/ (and OUT/merged with --merge), the loss curve, the closing line."""
    out = cfg.output.dir
    weights = full_state(raw_model, optimizer)[0] if fsdp else None  # collective: every rank gathers
    if master:
        metrics.close()
        save_final(out, raw_model, tokenizer, cfg, weights)
        if cfg.lora.merge and hasattr(raw_model, "merge_and_unload"):  # base + adapter as one plain model
            write_model_dir(os.path.join(out, "merged"), raw_model.merge_and_unload(), tokenizer, cfg)
            log(f"merged model (no peft needed) in {out}/merged")
        try:
            from EVAL import plot_metrics
            log(f"loss curve: {plot_metrics(out)}")
        except UserError as e:  # matplotlib is optional
            log(f"no loss curve: {e}")
        log(f"done: model in {out}/ - try: python INFER.py --model {out} --prompt \"...\"")
    barrier(world)


def main(argv):
    cfg, _, _ = CONFIG.load(argv, description=__doc__)
    train(cfg)
    shutdown()


if __name__ == "__main__":
    CONFIG.main_guard(main)
