"""Train a causal language model: the hand-written loop of LLM-MINI.

    python TRAIN.py                                   # the default experiment in config.yaml
    python TRAIN.py --model DIR --data a.txt b.jsonl --out out --epochs 1 --batch-size 2 --grad-accum 16
    python TRAIN.py --resume auto                     # continue the newest complete checkpoint in --out

Checkpoints go to OUT/ckpt-step-N/ (a save_pretrained directory plus training_state.pt), the final
model to OUT/. Logs and progress go to stderr, metrics to OUT/metrics.jsonl.
"""
import gc
import json
import math
import os
import shutil
import signal
import sys
import time

import CONFIG
from CHECKPOINT import (CONFIG_FILE, FULL, changed_settings, checkpoints, full_optimizer_state, load_state,
                        prepare_out_dir, resume_path, save_final, trim_metrics, write_model_dir)
from CONFIG import UserError, log


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


def setup(cfg, rank0_first):
    """Tokenizer, model and tokenized data for a fresh or resumed run. rank0_first(fn) runs fn on rank 0
    before the other ranks, so caches are written once and then read."""
    import torch
    from CHAT import with_template
    from DATA import check_files, check_loss_on, evenly_spaced, load
    from MODEL import build_model, check_source, context_length, load_pretrained, pick_device, quantization
    from TOKENIZER import cached_bpe, load_tokenizer
    m, t = cfg.model, cfg.training
    check_files(cfg.data.files + cfg.data.val_files)
    chat = "messages" in check_loss_on(cfg.data.files + cfg.data.val_files, cfg.data.loss_on).values()
    device = pick_device(m.device)
    resume = resume_path(cfg)
    if resume:  # the checkpoint holds the model and tokenizer; model.name is only where it started
        tokenizer = load_tokenizer(resume)
        q = quantization(cfg.lora, device)
        model = load_pretrained(resume, torch.float32, trainable=True, attn_implementation=m.attn_implementation,
                                quantization_config=q)  # an adapter checkpoint brings back its base + adapter
        model = model if q else model.to(device)
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


def keeps_documents_apart(model, device):
    """Whether the model attends within each packed document only: the second of two packed documents must
    get the logits it gets alone (transformers builds a block-diagonal mask from restarting position ids
    in the architectures that use its masking utilities; one that does not would mix documents)."""
    import torch
    ids = torch.arange(2, 10, device=device)[None] % model.config.vocab_size
    training = model.training
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=ids[:, 4:], use_cache=False).logits
        packed = model(input_ids=ids, position_ids=torch.arange(4, device=device).repeat(1, 2), use_cache=False).logits
    model.train(training)
    return torch.allclose(alone.float(), packed[:, 4:].float(), atol=1e-4, rtol=1e-4)


def shard(model):
    """FSDP2: shard every transformer block (the classes HF lists in _no_split_modules), then the rest."""
    from torch.distributed.fsdp import fully_shard
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    return fully_shard(model)


def compile_model(model):
    """torch.compile; where it cannot compile (no C++ compiler, an unsupported op) dynamo falls back to eager
    with a warning instead of failing the run."""
    import torch
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model)


def init_distributed():
    """(rank, world_size, local_rank) from the environment torchrun sets; (0, 1, 0) for plain `python TRAIN.py`."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    import torch
    import torch.distributed as dist
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def train(cfg):
    import torch
    import torch.distributed as dist
    import transformers
    from tqdm import tqdm
    from DATA import collate, gather, sample_indices
    from EVAL import validate
    from MODEL import no_padding_warning, pick_dtype
    t, out = cfg.training, cfg.output.dir
    transformers.utils.logging.disable_progress_bar()  # our own bar is the one progress line
    no_padding_warning()
    rank, world, local_rank = init_distributed()
    master = rank == 0  # only rank 0 logs, writes metrics and checkpoints
    barrier = dist.barrier if world > 1 else (lambda: None)
    if t.fsdp and (cfg.lora.enabled or cfg.lora.qlora):
        raise UserError("--fsdp with --lora is not supported - LoRA state is small: use plain torchrun (DDP)")
    if t.fsdp and world == 1:
        raise UserError("--fsdp shards the model over processes - launch with torchrun --nproc_per_node N TRAIN.py …")
    if master:
        prepare_out_dir(cfg)
    barrier()
    torch.manual_seed(t.seed)
    if t.deterministic:  # cuBLAS needs a fixed workspace for repeatable matmuls (set before its first use)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    def rank0_first(fn):
        result = fn() if master else None
        barrier()
        return result if master else fn()
    device, tokenizer, raw_model, (data, val_data, val_indices), resume = setup(cfg, rank0_first)
    device = f"cuda:{local_rank}" if device == "cuda" and world > 1 else device
    if getattr(raw_model, "hf_quantizer", None) is None:  # a 4-bit QLoRA base is already on its GPU
        raw_model.to(device)
    if t.grad_checkpointing:
        raw_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = compile_model(raw_model) if t.compile else raw_model  # checkpoints always save raw_model
    if t.fsdp:
        shard(raw_model)  # in place: parameters become DTensor shards
        model = compiled
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(compiled, device_ids=[local_rank] if "cuda" in device
                                                          else None)
    else:
        model = compiled
    # gradient all-reduce only on the last micro-step of an optimizer step
    sync_grads = raw_model.set_requires_gradient_sync if t.fsdp else (
        lambda on: setattr(model, "require_backward_grad_sync", on))

    # precision: autocast does the low-precision math over fp32 weights; the scaler is a no-op unless fp16
    device_type = device.split(":")[0]
    ptdtype = pick_dtype(cfg.model.dtype, device_type)
    autocast = torch.autocast(device_type=device_type, dtype=ptdtype, enabled=ptdtype != torch.float32)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    optimizer = torch.optim.AdamW(param_groups(raw_model, t.weight_decay), lr=t.learning_rate,
                                  betas=(t.beta1, t.beta2), fused=device_type == "cuda")
    step, position, bad_steps, best_val = 0, 0, 0, float("inf")
    if resume:
        state = load_state(resume, optimizer, scaler, rank, world, raw_model if t.fsdp else None)
        step, position, bad_steps = state["step"], state["position"], state["bad_steps"]
        best_val = state.get("best_val", float("inf"))
        log(f"resumed from {resume} at step {step}")
        if master:
            trim_metrics(os.path.join(out, "metrics.jsonl"), step)
    else:
        torch.manual_seed(t.seed + rank)  # dropout masks differ between ranks

    global_batch = t.batch_size * t.grad_accum * world
    total_steps = t.max_steps or math.ceil(t.epochs * len(data) / global_batch)
    n_params = sum(p.numel() for p in raw_model.parameters())
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    log(f"{n_params / 1e6:.2f}M parameters ({n_train / 1e6:.3f}M trainable) | {len(data)} sequences | "
        f"global batch {global_batch} = {t.batch_size} x {t.grad_accum} accum x {world} ranks | "
        f"{total_steps} steps ({CONFIG.warmup_of(t.warmup_steps, total_steps)} warmup) at peak lr {t.learning_rate:g} | "
        f"{device} {str(ptdtype)[6:]}")
    if master:
        with open(os.path.join(out, CONFIG_FILE), "w") as fh:
            fh.write(CONFIG.dump(cfg))
    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if master else None

    def gather_state():
        """(full model state dict, optimizer state) on every rank for FSDP; (None, local state) otherwise."""
        if not t.fsdp:
            return None, optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        weights = get_model_state_dict(raw_model, options=StateDictOptions(**FULL))  # rank 0 gets it, others {}
        for tied in getattr(raw_model, "all_tied_weights_keys", None) or {}:  # as save_pretrained: one copy
            weights.pop(tied, None)
        return weights, full_optimizer_state(raw_model, optimizer)

    def checkpoint(step, name=None):
        weights, optim_state = gather_state()
        rng = [torch.get_rng_state()]
        if world > 1:  # every rank's dropout RNG, so a resume on as many ranks continues exactly
            local = rng[0].to(device)  # NCCL gathers GPU tensors only; on CPU this is a no-op
            rng = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(rng, local)
            rng = [r.cpu() for r in rng]
        path = os.path.join(out, name or f"ckpt-step-{step}")
        if master:
            state = {"step": step, "position": position, "bad_steps": bad_steps, "best_val": best_val,
                     "optimizer": optim_state, "scaler": scaler.state_dict(), "rng_cpu": rng,
                     "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            write_model_dir(path, raw_model, tokenizer, cfg, state, weights)
            for _, old in checkpoints(out)[:-t.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()  # nobody goes on before the checkpoint is complete
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
    bar = tqdm(total=total_steps, initial=step, file=sys.stderr, dynamic_ncols=True, disable=None if master else True)
    t0, n_tokens, loss_sum, logged = time.perf_counter(), 0, torch.zeros((), device=device), 0
    run_start, val_time = t0, 0.0
    while step < total_steps:
        lr = lr_at(step, t, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = sample_indices(position, global_batch, len(data), t.seed)  # the global batch, same on all ranks
        # normalise by the target tokens of the whole global batch (every rank can count them, no all-reduce),
        # so accumulation and ranks == one big batch. DDP averages gradients over ranks: undo that with / world.
        n_targets, n_tokens = max(1, int(data.targets[idx].sum())), n_tokens + int(data.lengths[idx].sum())
        micro = [collate(gather(data, idx[(m * world + rank) * t.batch_size:][:t.batch_size]),
                         tokenizer.pad_token_id) for m in range(t.grad_accum)]  # this rank's share of each micro-step
        for m, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if world > 1:
                sync_grads(m == t.grad_accum - 1)
            with autocast:
                loss = model(**batch, num_items_in_batch=torch.tensor(n_targets / world, device=device),
                             use_cache=False).loss
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        finite = bool(torch.isfinite(norm))  # one host sync per optimizer step; equal on all ranks (synced grads)
        if finite or scaler.is_enabled():  # the fp16 scaler skips non-finite steps itself and lowers its scale
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        bad_steps = 0 if finite or scaler.is_enabled() else bad_steps + 1
        step, position, logged = step + 1, position + global_batch, logged + 1
        bar.update(1)
        if world > 1:  # ranks must agree to stop at the same step, or the others hang in the next all-reduce
            flag = torch.tensor(len(stop), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not stop:
                stop.append(signal.SIGTERM)

        last = step == total_steps or stop or bad_steps >= t.max_bad_steps
        if step % t.log_every == 0 or last:
            if world > 1:
                dist.all_reduce(loss_sum)  # each rank holds its share of the mean token loss
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss_sum.item() / logged / world, "lr": lr, "grad_norm": norm.item(),
                   "tokens_per_s": n_tokens / dt, "skipped_steps": bad_steps}
            if device_type == "cuda":  # peak GPU memory so far, against params + grads + AdamW state
                row["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            if master:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if bar.disable and master:  # no terminal (a log file, CI): a plain line instead of the progress bar
                log(f"step {step}/{total_steps} loss {row['loss']:.4f} lr {lr:.2e} {row['tokens_per_s']:.0f} tok/s")
            t0, n_tokens, loss_sum, logged = time.perf_counter(), 0, torch.zeros((), device=device), 0
        if val_data and ((t.eval_every and step % t.eval_every == 0) or last):
            v0 = time.perf_counter()
            val = validate(raw_model if world > 1 and not t.fsdp else model, val_data, val_indices, t.batch_size,
                           tokenizer.pad_token_id, device, autocast, rank, world)
            val_time, t0 = val_time + time.perf_counter() - v0, t0 + time.perf_counter() - v0  # tok/s: training only
            row = {"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 700)), "val_sequences": len(val_indices),
                   "val_share": val_time / (time.perf_counter() - run_start)}
            if master:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                bar.write(f"step {step}: validation loss {val:.4f}, perplexity {row['val_ppl']:.2f} ({len(val_indices)} "
                          f"sequences; validation is {row['val_share']:.0%} of the wall time so far)", file=sys.stderr)
            if t.save_best and val < best_val:
                best_val = val
                checkpoint(step, "ckpt-best")
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
    weights, _ = gather_state()
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
    barrier()


def main(argv):
    cfg, _, _ = CONFIG.load(argv, description=__doc__)
    train(cfg)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        # free DDP's reducer (and the gloo work it holds) first: gloo threads that outlive the process
        # group can abort the interpreter at exit (SIGABRT after a finished run, seen under load)
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    CONFIG.main_guard(main)
