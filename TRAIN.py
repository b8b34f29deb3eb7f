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

import torch
import torch._dynamo
import transformers

import BATCHES
import CHECKPOINT
import CONFIG
import DATA
import DEVICE
import DISTRIBUTED
import EVAL
import FLAGS
import GRPO
import LORA
import LOSS
import METRICS
import MODEL
import PREFERENCE
import RECOMPUTE
import REPORT
import SETTINGS
import SFT
import TOKENIZER
import TRACKERS
from CHAT import with_template
from REPORT import UserError, log


def lr_at(step, t, total_steps):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr_ratio."""
    warmup = CONFIG.warmup_of(t.warmup_steps, total_steps)
    if step < warmup:
        return t.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.learning_rate * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


OBJECTIVES = {"sft": SFT.SFT, "dpo": PREFERENCE.DPO, "grpo": GRPO.GRPO}  # CONFIG.objective; the parts: SFT.py


def param_groups(model, weight_decay):
    """Decay matrices (embeddings, linear weights); never biases or norm gains: decided by shape, not name."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def setup(cfg, run):
    """The run's ground, in a few steps: the output dir and seeds; the data's sources and kinds, checked against
    the objective; the tokenizer and model of a fresh or resumed run, on the device; cfg resolved against the
    model (max_length), read-only from here on. -> (cfg, the sources (training, validation), tokenizer, model,
    the checkpoint resumed or None)"""
    start(cfg, run)
    sources = DATA.sources(cfg.data)
    kinds = DATA.kinds(sources[0] + sources[1])
    DATA.check_loss_on(kinds, cfg.data.loss_on)
    check_kinds(kinds, cfg)
    resume = CHECKPOINT.resume_path(cfg)
    chat = bool({"messages", "preference"} & set(kinds.values()))  # the tokenizer needs a chat template
    tokenizer, model = checkpoint_model(cfg, run, resume) if resume else new_model(cfg, run, chat, sources[0])
    model = model if getattr(model, "hf_quantizer", None) else model.to(run.device)  # a 4-bit base is on its GPU
    MODEL.fuse_activations(model)
    cfg, note = SETTINGS.with_max_length(cfg, MODEL.context_length(model.config))
    for line in [note] + [f"note: resuming with settings that differ from the checkpoint's: {'; '.join(changed)}"
                          for changed in [CHECKPOINT.changed_settings(resume, cfg) if resume else []] if changed]:
        if line:
            log(line)
    return cfg, sources, tokenizer, model, resume


def start(cfg, run):
    """Checks that need no data or model, the output dir (rank 0, the others wait), the seed, determinism."""
    DISTRIBUTED.check_fsdp(cfg.training, cfg.lora, run)
    if run.master:
        CHECKPOINT.prepare_out_dir(cfg)
    DISTRIBUTED.barrier(run)
    torch.manual_seed(cfg.training.seed)
    if cfg.training.deterministic:  # cuBLAS needs a fixed workspace for repeatable matmuls (set before its first use)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def check_kinds(kinds, cfg):
    """Every source holds what the run's objective trains on (DPO: preference pairs, GRPO: prompts alone, SFT:
    the rest), and DPO and GRPO start from a trained model."""
    name = CONFIG.objective(cfg.training)
    if name != "sft" and cfg.model.from_scratch:
        raise UserError(f"training.{name}: {name.upper()} tunes a trained model against itself - pass --model DIR "
                        "(e.g. a supervised run's output), not --from-scratch")
    for source, kind in kinds.items():
        owner = next(n for n, o in OBJECTIVES.items() if kind in o.KINDS)
        if owner == name:
            continue
        what = {"preference": 'preference pairs ({"prompt", "chosen", "rejected"})',
                "prompt_only": 'prompts alone ({"prompt"} without a completion)'}.get(kind, f"{kind} samples")
        if name == "sft":
            raise UserError(f"{source}: holds {what} - add --{owner} to train on them ({owner.upper()}), or give "
                            "supervised data")
        wanted = {"dpo": 'preference pairs only ({"prompt", "chosen", "rejected"})',
                  "grpo": 'prompts only ({"prompt"}, and the fields the rewards read)'}[name]
        raise UserError(f"{source}: holds {what}, but --{name} trains on {wanted} - drop it, or train on it "
                        + (f"with --{owner}" if owner != "sft" else f"without --{name}"))


def objective_of(cfg, run, sources, tokenizer, scorer, resume):
    """The run's objective (SFT.py lists its parts) with its data; rank 0 writes the caches first."""
    t, pad = cfg.training, tokenizer.pad_token_id
    if t.grpo:
        return GRPO.GRPO(cfg, run, sources[0], tokenizer, scorer)
    if (cfg.data.packing or t.dpo) and not MODEL.keeps_documents_apart(scorer.model, run.device):
        what = "training.dpo" if t.dpo else "data.packing"  # a DPO pair is packed: chosen, then rejected
        raise UserError(f"{what}: {scorer.model.config.model_type} lets packed documents attend to each other (it "
                        "ignores restarting position ids)" + ("" if t.dpo else " - use --no-packing"))
    data, val = DISTRIBUTED.rank0_first(run, lambda: BATCHES.load(cfg.data, sources, tokenizer, t.max_length, t.dpo))
    if not t.dpo:
        return SFT.SFT(data, val, run, t, pad)
    # the reference is the model as it starts: its log-probabilities, computed once (rank 0 first)
    reference = DISTRIBUTED.rank0_first(run, lambda: PREFERENCE.with_reference(cfg, run, scorer, data, pad, resume))
    return PREFERENCE.DPO(data, reference, run, t, pad)


def checkpoint_model(cfg, run, resume):
    """A checkpoint's tokenizer and model (an adapter brings its base); model.name is only where the run began."""
    model = MODEL.load_pretrained(resume, torch.float32, trainable=True,
                                  attn_implementation=cfg.model.attn_implementation,
                                  quantization_config=LORA.quantization(cfg.lora, run.device))
    return TOKENIZER.load_tokenizer(resume), model


def new_model(cfg, run, chat, sources):
    """The tokenizer (the model's, --tokenizer, or a BPE trained on the training sources, rank 0 first) and the
    model to train."""
    m, tok = cfg.model, cfg.tokenizer
    for name, what in ((None if m.from_scratch else m.name, "model"), (tok.name, "tokenizer")):
        if name:
            MODEL.check_source(name, what)
    if tok.name or not m.from_scratch:
        tokenizer = TOKENIZER.load_tokenizer(tok.name or m.name, m.trust_remote_code)
    else:
        tokenizer = DISTRIBUTED.rank0_first(run, lambda: TOKENIZER.cached_bpe(sources, tok.vocab_size,
                                                                              cfg.data.cache_dir, chat))
    if chat:
        with_template(tokenizer)
    return tokenizer, MODEL.build_model(m, cfg.lora, tokenizer, run.device, cfg.training.seed)


def starting_progress(resume, run, optimizer, model, t):
    """Where the run begins: the checkpoint's Progress (optimizer, scaler and RNG restored), or step 0 with
    dropout seeded per rank."""
    if resume:
        return CHECKPOINT.load_state(resume, run, optimizer, model if t.fsdp else None)
    torch.manual_seed(t.seed + run.rank)  # dropout masks differ between ranks
    return CHECKPOINT.Progress()


def clip_gradients(model, max_norm):
    """Clip the global gradient norm to max_norm (0: no clipping) and return it (FSDP: gathered from shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def due(step, every, last):
    """Whether something done every N steps (0: never) happens at this step; everything happens at the last."""
    return bool(last or (every and step % every == 0))


def stop_signals(run):
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
    return lambda: DISTRIBUTED.agreed_max(caught[0] if caught else 0, run)


def train(cfg):
    """One training run, in nanoGPT's order. -> the exit code: 0, or 128 + the signal it stopped on."""
    transformers.logging.disable_progress_bar()  # our own bar is the one progress line
    MODEL.no_padding_warning()
    run = DISTRIBUTED.init(cfg.model)  # rank, world, device and precision: built once, passed as one value
    cfg, sources, tokenizer, raw_model, resume = setup(cfg, run)
    t, pad = cfg.training, tokenizer.pad_token_id
    # body and head as one module whose forward is the loss's input, never the full logits (LOSS.py)
    scorer = LOSS.Scorer(raw_model, chunked=t.chunked_loss and LOSS.chunks_exactly(raw_model, run.device) is None)
    objective = objective_of(cfg, run, sources, tokenizer, scorer, resume)
    val_idx = BATCHES.validation_subset(objective.val, t)
    mode, why = RECOMPUTE.plan(t, raw_model, DEVICE.free_memory(run.device, run.world))
    log(RECOMPUTE.apply(raw_model, mode, why))  # before wrapping: each decoder layer's own call changes
    torch._dynamo.config.suppress_errors = t.compile  # where it cannot compile: eager, with a warning
    model, sync_grads = DISTRIBUTED.wrap(scorer, t, run)
    eval_model = scorer if run.world > 1 and not t.fsdp else model  # not DDP's wrapper: no gradient sync to set up
    optimizer = torch.optim.AdamW(param_groups(raw_model, t.weight_decay), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                                  fused=run.device.type in ("cuda", "cpu"))  # one kernel for all parameters
    progress = starting_progress(resume, run, optimizer, raw_model, t)
    total_steps = t.max_steps or math.ceil(t.epochs * objective.size / objective.per_step)
    log(METRICS.summary(cfg, run, scorer, f"{objective.size} {objective.unit}", total_steps))
    if resume:
        log(f"resumed from {resume} at step {progress.step}")
    o = cfg.output  # the trackers start once the first log line is out (on rank 0)
    trackers = TRACKERS.open_all(o.report_to, o.dir, o.run_name, o.project, FLAGS.to_dict(cfg, CONFIG.TRAIN_SECTIONS),
                                 bool(resume)) if run.master and o.report_to else []
    metrics = METRICS.open_log(run, total_steps, progress.step,
                               CHECKPOINT.open_metrics(cfg, progress.step, resume) if run.master else None,
                               objective.names, trackers=trackers, out=o.dir)

    def save(name):  # collective: every rank calls it, rank 0 writes
        state = CHECKPOINT.training_state(run, optimizer, progress, raw_model if t.fsdp else None)
        return CHECKPOINT.save(run, cfg, name, raw_model, tokenizer, state)
    stop, started, signum, path = stop_signals(run), progress.step, 0, None
    last = progress.step >= total_steps
    model.train()
    while True:
        lr = lr_at(progress.step, t, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ran = progress.step > started  # nothing is due where a run starts: step 0, or a checkpoint already saved
        if ran and objective.val and due(progress.step, t.eval_every, last):
            v0 = time.perf_counter()
            val_loss = EVAL.validate(eval_model, objective.val, val_idx, run, t.batch_size, pad)
            shown = (EVAL.samples(raw_model, tokenizer, objective.val, val_idx, run)  # for the trackers
                     if metrics.trackers and not t.fsdp else [])
            METRICS.log_validation(metrics, progress.step, val_loss, len(val_idx), time.perf_counter() - v0, shown)
            if t.save_best and val_loss < progress.best_val:
                progress.best_val = val_loss
                save("ckpt-best")
        if ran and t.eval_tasks and due(progress.step, t.eval_tasks_every, last):  # benchmark scores, rank 0
            METRICS.log_tasks(metrics, progress.step, *EVAL.score_tasks(raw_model, tokenizer, t, run))
        if ran and due(progress.step, t.save_every, last):
            path = save(f"ckpt-step-{progress.step}")
        if last:
            break
        t0 = time.perf_counter()
        step = objective.prepare(progress.position)  # this rank's micro-batches (GRPO: generated and rewarded)
        t1 = time.perf_counter()
        step_sums = torch.cat([torch.zeros(1, device=run.device), step.stats])  # the loss, the objective's statistics
        for micro_step, batch in enumerate(step.micro_batches):
            sync_grads(micro_step == len(step.micro_batches) - 1)  # all-reduce once, on the last micro-step
            with run.autocast:
                loss, stats = objective.loss(model, batch, step.count)
            run.scaler.scale(loss).backward()
            step_sums += torch.cat([loss.detach()[None], stats.detach()])
        run.scaler.unscale_(optimizer)
        norm = clip_gradients(raw_model, t.grad_clip)
        # one host sync per step, the same on all ranks (synced gradients); the fp16 scaler skips a non-finite
        # step itself and lowers its scale, so only without it is such a step bad
        bad = not torch.isfinite(norm) and not run.scaler.is_enabled()
        if not bad:
            run.scaler.step(optimizer)
        run.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.step, progress.position = progress.step + 1, progress.position + objective.per_step
        progress.bad_steps = progress.bad_steps + 1 if bad else 0
        METRICS.tally(metrics, step_sums, step.tokens, t1 - t0, time.perf_counter() - t1)
        signum = stop()
        last = progress.step == total_steps or signum > 0 or progress.bad_steps >= t.max_bad_steps
        if due(progress.step, t.log_every, last):
            METRICS.log_step(metrics, run, progress, lr, norm)
    METRICS.close(metrics)
    if t.compile:
        log(DISTRIBUTED.compile_report())
    if progress.bad_steps >= t.max_bad_steps and progress.step > started:
        raise UserError(f"{progress.bad_steps} optimizer steps in a row had non-finite gradients and were skipped; "
                        f"the last good weights are in {path} - lower --learning-rate or use --dtype float32")
    if signum:
        log(f"checkpoint written to {path}\nresume with: python TRAIN.py {' '.join(sys.argv[1:])} --resume auto")
        return 128 + signum
    finish(run, cfg, raw_model, tokenizer)
    return 0


def finish(run, cfg, raw_model, tokenizer):
    """The final model in OUT/ (and OUT/merged with --merge), the closing line."""
    out = cfg.output.dir
    weights = CHECKPOINT.full_weights(raw_model) if cfg.training.fsdp else None  # collective: every rank gathers
    if run.master:
        CHECKPOINT.save_final(out, raw_model, tokenizer, cfg, weights)
        if cfg.lora.merge and hasattr(raw_model, "merge_and_unload"):  # base + adapter as one plain model
            CHECKPOINT.write_model_dir(os.path.join(out, "merged"), raw_model.merge_and_unload(), tokenizer, cfg)
            log(f"merged model (no peft needed) in {out}/merged")
        log(f"done: model in {out}/ - try: python INFER.py --model {out} --prompt \"...\"")
    DISTRIBUTED.barrier(run)


def main(argv):
    cfg, resolved = SETTINGS.load(argv, description=__doc__)
    if resolved.print_only:
        return FLAGS.print_config(cfg, resolved)
    TRACKERS.check(cfg.output.report_to)  # a tracker's missing package is said before anything runs
    log(resolved.summary)  # the first line: the config read, what was dropped and chosen for this run
    code = train(cfg)
    DISTRIBUTED.shutdown()
    return code


if __name__ == "__main__":
    REPORT.main_guard(main)
