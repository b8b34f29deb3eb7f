"""Checkpoints: the on-disk format of a training run, written atomically and read back safely.

OUT/ckpt-step-N/ is a save_pretrained directory (config.json, model.safetensors, tokenizer files) plus
train_config.yaml and training_state.pt (the run's Progress, optimizer, GradScaler and RNG states:
tensors and plain data only, read with weights_only=True). A checkpoint is written to a temporary
sibling, flushed to disk and renamed into place when complete (ATOMIC.py), so the newest ckpt-step-N
is always whole, even after a power cut.
"""
import dataclasses
import json
import os
import pickle
import re
import shutil

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

import CONFIG
import FLAGS
from ATOMIC import clear_stale, replacing
from DISTRIBUTED import barrier
from REPORT import UserError, first_line, log

STATE = "training_state.pt"
CONFIG_FILE = "train_config.yaml"
METRICS_FILE = "metrics.jsonl"
FULL = dict(full_state_dict=True, cpu_offload=True)
# what a run writes into OUT: checkpoints, the merged model, its log, config and curves, and the final model's and
# tokenizer's files (save_pretrained's names); anything else there is the user's and is never removed
RUN_FILE = re.compile(r"ckpt-step-\d+|ckpt-best|merged|final|metrics\.jsonl|train_config\.yaml|(loss|reward)\.png"
                      r"|(generation_|adapter_)?config\.json|(adapter_)?model(-\d+-of-\d+)?\.safetensors"
                      r"|model\.safetensors\.index\.json|tokenizer(_config)?\.json|tokenizer\.model"
                      r"|special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)|vocab\.(json|txt)"
                      r"|merges\.txt|trackers\.json|tensorboard|wandb|mlflow\.db|mlruns")  # the last five: TRACKERS.py


@dataclasses.dataclass
class Progress:
    """Where a run stands: the training state that training_state.pt stores beside optimizer, scaler and RNG."""
    step: int = 0                  # optimizer steps taken
    position: int = 0              # global sample index in the seeded order (BATCHES.sample_indices)
    bad_steps: int = 0             # non-finite steps in a row
    best_val: float = float("inf")  # lowest validation loss so far (--save-best)


def checkpoints(out_dir):
    """Complete checkpoints in out_dir as [(step, path)], oldest first. Incomplete ones never get this name."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = re.fullmatch(r"ckpt-step-(\d+)", name)
        if m and os.path.exists(os.path.join(out_dir, name, STATE)):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def write_model_dir(path, model, tokenizer, cfg, state=None, state_dict=None):
    """Write a loadable model directory to a temporary sibling, then rename it into place (atomic)."""
    try:
        with replacing(path) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
                fh.write(FLAGS.dump(cfg, CONFIG.TRAIN_SECTIONS))
            if state is not None:
                torch.save(state, os.path.join(tmp, STATE))
    except Exception as e:  # OSError from Python, SafetensorError/RuntimeError from the writers' native code
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"{path}: could not write the checkpoint ({reason}) - free disk space or fix "
                        "permissions; the previous checkpoint is intact")


def training_state(run, optimizer, progress, fsdp_model=None):
    """What training_state.pt holds: the Progress, optimizer and scaler states, and every rank's RNG, so a resume
    on as many ranks continues dropout exactly (collective under torchrun: every rank calls it; only rank 0's
    is written). fsdp_model: an FSDP run's model, whose optimizer state is gathered to rank 0 from its shards."""
    optim_state = full_optimizer_state(fsdp_model, optimizer) if fsdp_model else optimizer.state_dict()
    rng = [torch.get_rng_state()]
    if run.world > 1:
        local = rng[0].to(run.device)  # NCCL gathers GPU tensors only; on CPU this is a no-op
        rng = [torch.empty_like(local) for _ in range(run.world)]
        dist.all_gather(rng, local)
        rng = [r.cpu() for r in rng]
    return {**dataclasses.asdict(progress), "optimizer": optim_state, "scaler": run.scaler.state_dict(),
            "rng_cpu": rng, "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save(run, cfg, name, model, tokenizer, state):
    """Write OUT/name, a complete checkpoint of model, tokenizer, config and training_state(…) (collective under
    torchrun: every rank calls it, rank 0 writes, nobody goes on before it is complete). -> its path"""
    weights = full_weights(model) if cfg.training.fsdp else None
    path = os.path.join(cfg.output.dir, name)
    if run.master:
        write_model_dir(path, model, tokenizer, cfg, state, weights)
        for _, stale in checkpoints(cfg.output.dir)[:-cfg.training.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier(run)
    return path


def full_weights(model):
    """An FSDP model's full state dict, gathered to rank 0 (the other ranks get {}; collective), so the
    checkpoint format is the same for plain, DDP and FSDP runs."""
    weights = get_model_state_dict(model, options=StateDictOptions(**FULL))
    for tied in getattr(model, "all_tied_weights_keys", None) or {}:  # as save_pretrained: one copy
        weights.pop(tied, None)
    return weights


def save_final(out_dir, model, tokenizer, cfg, state_dict=None):
    """The final model goes to OUT/ itself; files are moved in one by one from a complete temporary copy."""
    staging = os.path.join(out_dir, "final")
    write_model_dir(staging, model, tokenizer, cfg, state_dict=state_dict)
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)


def prepare_out_dir(cfg):
    """Refuse to start over a previous run unless told to (--overwrite: remove all of it, keep anything else);
    clear half-written checkpoints of killed runs."""
    out = cfg.output.dir
    os.makedirs(out, exist_ok=True)
    clear_stale(out)
    previous = [p for _, p in checkpoints(out)] + [p for p in ("model.safetensors", "adapter_model.safetensors")
                                                   if os.path.exists(os.path.join(out, p))]
    if cfg.training.resume is not None or not previous:
        return
    if not cfg.output.overwrite:
        raise UserError(f"{out}: already holds a training run ({', '.join(os.path.basename(p) for p in previous)})"
                        " - continue it with --resume auto, pick another --out, or pass --overwrite")
    mine = [n for n in os.listdir(out) if is_run_file(out, n)]
    for name in mine:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    kept = sorted(set(os.listdir(out)) - set(mine))
    log(f"--overwrite: removed the previous run in {out} ({len(mine)} files and folders)"
        + (f"; kept {', '.join(kept)}: not a training run's" if kept else ""))


def is_run_file(out, name):
    """Whether OUT/name is something a training run writes (peft's model card too: a README.md that says so)."""
    if name == "README.md":
        with open(os.path.join(out, name), encoding="utf-8", errors="replace") as fh:
            return "library_name: peft" in fh.read(4096)
    return RUN_FILE.fullmatch(name) is not None


def open_metrics(cfg, step, resumed):
    """OUT/metrics.jsonl open for appending, from `step` on (a resumed run's rows after it are dropped: those
    steps run again), after OUT/train_config.yaml is written: rank 0's part of the run's log on disk."""
    out, path = cfg.output.dir, os.path.join(cfg.output.dir, METRICS_FILE)
    if resumed and os.path.exists(path):
        with open(path) as fh:
            rows = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as fh:
            fh.writelines(rows)
    with open(os.path.join(out, CONFIG_FILE), "w") as fh:
        fh.write(FLAGS.dump(cfg, CONFIG.TRAIN_SECTIONS))
    return open(path, "a")


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


def changed_settings(path, cfg):
    """["key: checkpoint's value -> this run's"] for settings (output dir and resume aside) that differ from
    those the checkpoint at `path` was trained with, e.g. a resume typed without the run's --model."""
    saved = os.path.join(path, CONFIG_FILE)
    old = yaml.safe_load(open(saved)) if os.path.exists(saved) else {}
    return [f"{sec}.{k}: {old[sec][k]!r} -> {v!r}" for sec, values in FLAGS.to_dict(cfg, CONFIG.TRAIN_SECTIONS).items() if sec != "output"
            for k, v in values.items() if k != "resume" and k in old.get(sec, {}) and old[sec][k] != v]


def load_state(path, run, optimizer, fsdp_model=None):
    """Restore optimizer, scaler and RNG from training_state.pt and return the run's Progress.
    weights_only=True: tensors and plain data only."""
    try:
        state = torch.load(os.path.join(path, STATE), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}/{STATE}: refused to load ({first_line(e, 160)}) - it is corrupt or holds "
                        "objects other than tensors; use another checkpoint")
    try:
        if fsdp_model is None:
            optimizer.load_state_dict(state["optimizer"])
        else:
            set_full_optimizer_state(fsdp_model, optimizer, state["optimizer"])
        for group in optimizer.param_groups:
            for p in group["params"]:
                s = optimizer.state.get(p, {})
                if "exp_avg" in s and s["exp_avg"].shape != p.shape:
                    raise ValueError(f"optimizer state of shape {tuple(s['exp_avg'].shape)} for a parameter of "
                                     f"shape {tuple(p.shape)}")
        run.scaler.load_state_dict(state["scaler"])
        rngs = state["rng_cpu"]
        if len(rngs) == run.world:
            torch.set_rng_state(rngs[run.rank])
        else:  # the world size changed: dropout cannot continue exactly, so re-seed it per rank
            torch.manual_seed(state["step"] * 1000 + run.rank)
            log(f"note: checkpoint written by {len(rngs)} processes, resumed on {run.world}: dropout RNG re-seeded")
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}/{STATE}: does not match the model ({first_line(e, 160)}) - resume with the "
                        "checkpoint's own model directory, or start fresh")
    return Progress(**{f.name: state.get(f.name, f.default) for f in dataclasses.fields(Progress)})


def full_optimizer_state(model, optimizer):
    """An FSDP optimizer's state gathered and keyed by parameter index, as optimizer.state_dict() is, so the
    checkpoint format is the same for plain, DDP and FSDP runs (collective: every rank calls it)."""
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**FULL))
    if not full:  # with cpu_offload only rank 0 receives the gathered state
        return {}
    index = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
    return {"state": {index[n]: s for n, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def set_full_optimizer_state(model, optimizer, state):
    """load_state's counterpart of full_optimizer_state: the index-keyed state into the FSDP optimizer's shards."""
    names = {p: n for n, p in model.named_parameters()}
    name = [names[p] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {name[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
