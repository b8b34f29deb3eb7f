"""Checkpoints: the on-disk format of a training run, written atomically and read back safely.

OUT/ckpt-step-N/ is a save_pretrained directory (config.json, model.safetensors, tokenizer files) plus
train_config.yaml and training_state.pt (optimizer, GradScaler, RNG, step, data position: tensors and
plain data only, read with weights_only=True). A checkpoint is written to .tmp-… and renamed into place
when complete, so the newest ckpt-step-N is always whole.
"""
import json
import os
import re
import shutil

import CONFIG
from CONFIG import UserError, log

STATE = "training_state.pt"
CONFIG_FILE = "train_config.yaml"


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
    import torch
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.path.basename(path)}-{os.getpid()}")
    old = path + f".old-{os.getpid()}"  # a same-named predecessor (ckpt-best), kept until the new one is in place
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
            fh.write(CONFIG.dump(cfg))
        if state is not None:
            torch.save(state, os.path.join(tmp, STATE))
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # OSError from Python, SafetensorError/RuntimeError from the writers' native code
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(path):
            os.rename(old, path)
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"{path}: could not write the checkpoint ({reason}) - free disk space or fix "
                        "permissions; the previous checkpoint is intact")


def save_final(out_dir, model, tokenizer, cfg, state_dict=None):
    """The final model goes to OUT/ itself; files are moved in one by one from a complete temporary copy."""
    staging = os.path.join(out_dir, "final")
    write_model_dir(staging, model, tokenizer, cfg, state_dict=state_dict)
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)


def prepare_out_dir(cfg):
    """Refuse to start over a previous run unless told to; clear half-written checkpoints of killed runs."""
    out = cfg.output.dir
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        original = os.path.join(out, name.split(".old-")[0])
        if ".old-" in name and not os.path.exists(original):  # killed between the two renames: put it back
            os.rename(os.path.join(out, name), original)
        elif name.startswith(".tmp-") or ".old-" in name:
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            log(f"removed incomplete checkpoint {os.path.join(out, name)} left by an interrupted run")
    previous = [p for _, p in checkpoints(out)] + [p for p in ("model.safetensors", "adapter_model.safetensors")
                                                   if os.path.exists(os.path.join(out, p))]
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


def changed_settings(path, cfg):
    """["key: checkpoint's value -> this run's"] for settings (output dir and resume aside) that differ from
    those the checkpoint at `path` was trained with, e.g. a resume typed without the run's --model."""
    import yaml
    saved = os.path.join(path, CONFIG_FILE)
    old = yaml.safe_load(open(saved)) if os.path.exists(saved) else {}
    return [f"{sec}.{k}: {old[sec][k]!r} -> {v!r}" for sec, values in CONFIG.to_dict(cfg).items() if sec != "output"
            for k, v in values.items() if k != "resume" and k in old.get(sec, {}) and old[sec][k] != v]


def load_state(path, optimizer, scaler, rank=0, world=1, fsdp_model=None):
    """Restore optimizer, scaler and RNG from training_state.pt. weights_only=True: tensors and plain data only."""
    import pickle
    import torch
    try:
        state = torch.load(os.path.join(path, STATE), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}/{STATE}: refused to load ({str(e).splitlines()[0][:160]}) - it is corrupt or holds "
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
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng_cpu"]
        if len(rngs) == world:
            torch.set_rng_state(rngs[rank])
        else:  # the world size changed: dropout cannot continue exactly, so re-seed it per rank
            torch.manual_seed(state["step"] * 1000 + rank)
            log(f"note: checkpoint written by {len(rngs)} processes, resumed on {world}: dropout RNG re-seeded")
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}/{STATE}: does not match the model ({str(e).splitlines()[0][:160]}) - resume with the "
                        "checkpoint's own model directory, or start fresh")
    return state


FULL = dict(full_state_dict=True, cpu_offload=True)


def full_optimizer_state(model, optimizer):
    """An FSDP optimizer's state gathered and keyed by parameter index, as optimizer.state_dict() is, so the
    checkpoint format is the same for plain, DDP and FSDP runs (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**FULL))
    if not full:  # with cpu_offload only rank 0 receives the gathered state
        return {}
    index = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
    return {"state": {index[n]: s for n, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def set_full_optimizer_state(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {p: n for n, p in model.named_parameters()}
    name = [names[p] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {name[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
