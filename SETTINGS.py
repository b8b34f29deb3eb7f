"""Which value each setting takes in a run, and why: the order of the schema's defaults, the YAML file, the flags
and the defaults of the run's purpose, written once (load), and the first log line that says what was read,
dropped and chosen for the user. A loaded config is frozen: what a run resolves later (the max_length its
model allows: with_max_length) is a new copy, never a change behind the reader's back.

    python SETTINGS.py --print-config        # the resolved config of the training scripts
    python SETTINGS.py --reference           # every key and flag as Markdown (docs/configuration.md)
"""
import os

import yaml

import CONFIG
import FLAGS
from CONFIG import purpose
from FLAGS import replaced
from REPORT import UserError, log, main_guard


def load(argv, sections=CONFIG.TRAIN_SECTIONS, description=None, config_default="config.yaml", required=(), usage=""):
    """The script's Config from its command line, frozen, and what was decided for the user (Resolved).

    The order; each step overrides the ones before it only where it sets a value:
      1. the schema's defaults (CONFIG.py's dataclasses);
      2. the YAML file: --config PATH; or, for TRAIN.py, ./config.yaml (the default experiment), but only when
         the command names neither --config nor --model (a --model is the user's own run, not the demo);
      3. the flags; a --model flag without --from-scratch also drops the YAML's from_scratch, config_overrides and
         dropout (they shape a model built from scratch, not a pretrained one);
      4. the defaults of the run's purpose (CONFIG.PURPOSE_DEFAULTS) fill the settings still unset (None); --qlora
         sets lora.enabled;
      5. once the model is loaded, TRAIN.py resolves training.max_length against it (with_max_length).
    required: keys the YAML or flags must set (usage: an example command for the error)."""
    args, path, explicit, print_only = FLAGS.parse(CONFIG.Config, argv, sections, description, config_default)
    skipped = path if not explicit and path and os.path.exists(path) and "model.name" in args else None
    path = path if explicit or (path and os.path.exists(path) and not skipped) else None
    raw, dropped = with_flags(FLAGS.read_yaml(path) if path else {}, args)
    FLAGS.require(raw, required, CONFIG.Config, sections, usage)
    cfg = FLAGS.build(CONFIG.Config, raw, sections, f"{path} + flags" if path else "flags", CONFIG.rules)
    if "training" not in sections:
        return cfg, FLAGS.Resolved(None, {}, sections, print_only)
    cfg, chosen, notes = resolve_purpose(cfg)
    said = [f"config: {path}" if path else "config: built-in defaults"]
    unread = [f"{sec}.{k}" for sec, v in (FLAGS.read_yaml(skipped) if skipped else {}).items()
              if isinstance(v, dict) for k in v]
    said += [f"{skipped} not read, so its {', '.join(unread)} do not apply (--model names your own run; --config "
             f"{skipped} to use it)"] if skipped else []
    said += [f"dropped from {path}: {', '.join(dropped)} (--model without --from-scratch: a pretrained model)"] \
        if dropped else []
    said += [f"purpose: {purpose(cfg)}" + (f", so {chosen}" if chosen else "")]
    return cfg, FLAGS.Resolved(" | ".join(said), notes, sections, print_only)


def with_flags(raw, args):
    """The YAML's nested dict with the command line's values written over it, and the YAML keys dropped: a
    --model flag without --from-scratch means "start from that model's weights", so the YAML's scratch shape
    (from_scratch, config_overrides, dropout) goes. -> (raw, ["model.from_scratch", …])"""
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    dropped = [f"model.{k}" for k in ("from_scratch", "config_overrides", "dropout") if k in model] \
        if "model.name" in args and "model.from_scratch" not in args else []
    if dropped:
        raw["model"] = {k: v for k, v in model.items() if f"model.{k}" not in dropped}
    return FLAGS.overlay(raw, args), dropped


def resolve_purpose(cfg):
    """cfg with its unset settings filled by the defaults of the run's purpose (QLoRA is LoRA on a 4-bit base),
    the values chosen ("learning_rate=5.0e-05, …") and the notes that mark them in --print-config."""
    implied = {"lora.enabled": "implied by --qlora"} if cfg.lora.qlora and not cfg.lora.enabled else {}
    cfg = replaced(cfg, {"lora.enabled": True}) if implied else cfg
    filled = {key: value for key, value in CONFIG.PURPOSE_DEFAULTS[purpose(cfg)].items()
              if getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) is None}
    cfg = replaced(cfg, filled)
    chosen = ", ".join([f"{k.split('.')[1]}={yaml.safe_dump(v).split(chr(10))[0]}" for k, v in filled.items()]
                       + (["lora enabled (--qlora)"] if implied else []))
    notes = implied | {k: f"{purpose(cfg)} default" for k in filled}
    if cfg.training.max_length is None:
        notes["training.max_length"] = f"the model's context, at most {CONFIG.MAX_LENGTH_CAP}"
    if cfg.training.recompute == "auto":
        notes["training.recompute"] = "decided once the model is loaded: nothing, unless memory is short (RECOMPUTE.py)"
    return cfg, chosen, notes


def with_max_length(cfg, context):
    """cfg with training.max_length resolved against the model's context (by default the context, at most
    CONFIG.MAX_LENGTH_CAP), and the log line that says so (None when it was set)."""
    if (cfg.training.max_length or 0) > context:
        raise UserError(f"training.max_length: {cfg.training.max_length} is above the model's context of {context} "
                        "tokens - lower --max-length")
    if cfg.training.max_length:
        return cfg, None
    length = min(context, CONFIG.MAX_LENGTH_CAP)
    note = f"max_length {length}: the model's context of {context} tokens" + (
        f", capped at {CONFIG.MAX_LENGTH_CAP} (--max-length to change)" if context > length else "")
    return replaced(cfg, {"training.max_length": length}), note


def main(argv):
    """python SETTINGS.py --reference | --print-config [flags]"""
    if argv == ["--reference"]:
        print(FLAGS.markdown(CONFIG.Config, CONFIG.SCRIPTS), end="")
        return 0
    cfg, resolved = load(argv, description=__doc__)
    if resolved.print_only:
        return FLAGS.print_config(cfg, resolved)
    log(resolved.summary)
    return 0


if __name__ == "__main__":
    main_guard(main)
