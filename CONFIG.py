"""The one config schema of LLM-MINI: YAML keys, CLI flags, defaults, validation and the saved copy.

Every setting is a field of a dataclass below; nothing else names a setting. A field `training.batch_size`
is the YAML key `training: {batch_size: …}` and the flag `--batch-size` (or `--training.batch-size`).
Precedence, in full in load(): defaults < the YAML file < flags < the defaults of the run's purpose, which
fill only what is still unset.

This file is the schema (read it top to bottom: sections, then the defaults that depend on the run's
purpose) and load(), what every script calls. The generic machinery that turns any such schema into
YAML keys, flags, type checks and "did you mean" errors is FLAGS.py. A loaded config is frozen: what a run
resolves later (the max_length its model allows) is a new copy, never a change behind the reader's back.

    python CONFIG.py --print-config        # the resolved config of the training scripts
    python CONFIG.py --reference           # every key and flag as Markdown (docs/configuration.md)
"""
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

import FLAGS
from FLAGS import UserError, first_line, log, main_guard, need, opt, replaced, suggest  # noqa: F401 (used from here)


@dataclass(frozen=True)
class ModelCfg:
    name: str = opt("gpt2", "local model directory, hub id, or (with from_scratch) an architecture: gpt2, llama, …",
                    flag="--model")
    from_scratch: bool = opt(False, "build a randomly initialised model of architecture `name`; "
                             "a --model on the command line without --from-scratch loads pretrained weights")
    config_overrides: dict = opt({}, "architecture settings for from_scratch, e.g. '{n_layer: 4, n_embd: 256}'")
    device: Literal["auto", "cuda", "mps", "cpu"] = opt("auto", "auto picks cuda, then mps, then cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "autocast precision; auto = bfloat16 on CUDA/CPUs with native bf16, float16 on older CUDA, else float32")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt(
        "sdpa", "attention kernel (flash_attention_2 needs CUDA and the flash-attn package)")
    dropout: Optional[float] = opt(None, "every dropout rate of a from-scratch model's config (config_overrides "
                                   "win); default by purpose: 0 from scratch (nanoGPT's for pretraining); a "
                                   "pretrained model keeps its own", min=0, at_most=1)
    trust_remote_code: bool = opt(False, "allow a model directory or hub repo to run its own Python code")
    base_model: Optional[str] = opt(None, "for a LoRA adapter directory: the base model (default: the one named "
                                    "in its adapter_config.json)")


@dataclass(frozen=True)
class TokenizerCfg:
    name: Optional[str] = opt(None, "tokenizer directory or hub id; default: the model's, or a new BPE for scratch",
                              flag="--tokenizer")
    vocab_size: int = opt(4096, "vocabulary size of the byte-level BPE trained for a scratch model", min=260)


@dataclass(frozen=True)
class DataCfg:
    files: list = opt(["data/train.txt", "data/train.jsonl"],
                      "data files (.txt, .jsonl, .json, .csv, .tsv, .parquet; .gz/.zst), folders of them, save_to_disk "
                      "folders or Hub dataset ids (docs/data.md)", flag="--data")
    columns: dict = opt({}, "read a dataset's columns under LLM-MINI's keys, e.g. '{text: content}' or --columns "
                        "text=content,prompt=question; a key mapped to nothing ignores that column", flag="--columns")
    split: str = opt("train", "the split of a Hub dataset, dataset folder or save_to_disk DatasetDict",
                     flag="--data-split")
    subset: Optional[str] = opt(None, "a Hub dataset's configuration (load_dataset's name)", flag="--data-subset")
    revision: Optional[str] = opt(None, "a Hub dataset's branch, tag or commit (default: main)", flag="--data-revision")
    streaming: bool = opt(False, "read a Hub dataset as it downloads, tokenizing rows as they arrive, instead of "
                                 "downloading it first")
    max_samples: Optional[int] = opt(None, "read at most this many samples of each source (then stop reading)", min=1)
    packing: Optional[bool] = opt(None, "join documents with EOS and cut into max_length blocks; --no-packing: one "
                                  "padded sample per document; default by purpose: packing from scratch only")
    loss_on: Optional[Literal["all", "assistant", "completion", "last_assistant"]] = opt(
        None, "which tokens are trained on (targets); default: all for text, assistant for conversations, "
        "completion for prompt/completion")
    too_long: Literal["truncate", "drop"] = opt("truncate", "a sample longer than max_length is truncated (its "
                                                "targets that fit are kept) or dropped; one warning counts them")
    val_files: list = opt([], "validation data: files, folders or datasets, as --data", flag="--val-data")
    val_split: str = opt("validation", "the split read from a dataset given to --val-data")
    val_fraction: float = opt(0.0, "hold out this fraction of the documents (the last ones) for validation",
                              min=0, at_most=0.5)
    val_max_tokens: int = opt(1_000_000, "but hold out no more documents than fit in this many tokens", min=1)
    cache_dir: str = opt("data/.cache", "where tokenized data is cached (memory-mapped, reused across runs)")


@dataclass(frozen=True)
class LoraCfg:
    enabled: bool = opt(False, "train LoRA adapters (peft) instead of all weights", flag="--lora")
    r: int = opt(8, "LoRA rank", flag="--lora-r", min=1)
    alpha: float = opt(16.0, "LoRA scaling alpha (the update is scaled by alpha / r)", flag="--lora-alpha", above=0)
    dropout: float = opt(0.05, "dropout on the LoRA input", flag="--lora-dropout", min=0, at_most=1)
    target_modules: list = opt([], "modules to adapt; default: peft's all-linear (every linear layer but the "
                               "output head)", flag="--lora-target-modules")
    bias: Literal["none", "all", "lora_only"] = opt("none", "which biases to train", flag="--lora-bias")
    qlora: bool = opt(False, "load the base in 4-bit NF4 (bitsandbytes, CUDA only) and train LoRA on it (implies "
                             "--lora)", flag="--qlora")
    merge: bool = opt(False, "after training also write OUT/merged: base + adapter as one plain model",
                      flag="--merge")


@dataclass(frozen=True)
class TrainingCfg:
    epochs: float = opt(1.0, "passes over the data (ignored when max_steps is set)", above=0)
    max_steps: Optional[int] = opt(None, "optimizer steps to run; overrides epochs", min=1)
    batch_size: int = opt(8, "sequences per micro-batch", min=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", min=1)
    learning_rate: Optional[float] = opt(None, "peak learning rate; default by purpose: 1e-3 from scratch, 5e-5 full "
                                         "fine-tune, 2e-4 LoRA, 1e-6 DPO, 5e-6 DPO with LoRA", above=0)
    min_lr_ratio: float = opt(0.1, "cosine decay ends at learning_rate * min_lr_ratio", min=0, at_most=1)
    warmup_steps: float = opt(0.05, "linear warmup: a number of steps, or below 1 a fraction of the run", min=0)
    weight_decay: float = opt(0.1, "AdamW decay of matrices (dim >= 2); biases and norms are not decayed", min=0)
    beta1: float = opt(0.9, "AdamW beta1", min=0, at_most=1)
    beta2: float = opt(0.95, "AdamW beta2", min=0, at_most=1)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)", min=0)
    max_length: Optional[int] = opt(None, "tokens per sequence; longer samples are truncated; default: the model's "
                                    "context, at most 1024", min=2)
    seed: int = opt(1337, "seed of initialisation, data order and dropout")
    save_every: int = opt(100, "write a checkpoint every N optimizer steps (0 = only at the end)", min=0)
    keep_last: int = opt(3, "checkpoints to keep (older ones are deleted)", min=1)
    log_every: int = opt(10, "log loss, lr and tokens/s every N steps", min=1)
    resume: Optional[str] = opt(None, "'auto' (newest complete checkpoint in the output dir) or a checkpoint path",
                                const="auto")
    max_bad_steps: int = opt(5, "stop after this many non-finite steps in a row", min=1)
    eval_every: int = opt(0, "compute validation loss every N steps (0 = only at the end, when there is val data)",
                          min=0)
    eval_batches: int = opt(20, "validation scores this many batches: the same evenly spread subset of the "
                                "validation sequences each time (0 = all of them)", min=0)
    save_best: bool = opt(False, "keep the checkpoint with the lowest validation loss in OUT/ckpt-best")
    fsdp: bool = opt(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2 fully_shard)")
    compile: bool = opt(False, "torch.compile the model (falls back to eager, with a warning, where it cannot)")
    chunked_loss: bool = opt(True, "compute the loss chunk by chunk, never the full logits (LOSS.py; the "
                             "model's own loss where that is not equivalent); --no-chunked-loss: the model's own")
    dpo: bool = opt(False, "preference tuning (DPO) on prompt/chosen/rejected pairs instead of supervised "
                    "fine-tuning; the reference is the starting model (PREFERENCE.py)")
    dpo_beta: float = opt(0.1, "DPO's beta: how far the tuned model may move from the reference (TRL's default)",
                          above=0)
    grpo: bool = opt(False, "reinforcement learning with verifiable rewards (GRPO, GRPO.py) on prompt-only rows: "
                            "sample completions, score them with --reward functions, reinforce the better ones")
    reward: list = opt([], "GRPO's reward functions, FILE.py:NAME each (repeatable): NAME(prompts, completions, "
                           "**columns) -> a float or None per completion, as TRL's GRPOTrainer calls them")
    reward_weights: list = opt([], "GRPO: a weight per --reward function (default: 1 each)")
    num_generations: int = opt(8, "GRPO: completions sampled per prompt, the group its advantages are relative to",
                               min=2)
    max_completion_length: int = opt(512, "GRPO: tokens a completion may have at most", min=1)
    grpo_temperature: float = opt(1.0, "GRPO: sampling temperature of the completions (and of their "
                                       "log-probabilities, as TRL)", above=0)
    grpo_epsilon: float = opt(0.2, "GRPO: the policy ratio is clipped to [1 - epsilon, 1 + epsilon]", above=0)
    grpo_beta: float = opt(0.0, "GRPO: weight of the KL penalty to the reference, the starting model (0: none, as "
                                "TRL; > 0 under LoRA: the adapter disabled, else a second copy)", min=0)
    recompute: Literal["cheap", "all", "none"] = opt(
        "cheap", "what backward recomputes instead of keeping (RECOMPUTE.py): cheap = element-wise results, matmul "
        "and attention outputs kept (the same gradients, less memory, little time); all = whole layers "
        "(gradient checkpointing: least memory, about a third more time); none = keep everything")
    deterministic: bool = opt(False, "deterministic algorithms only (torch.use_deterministic_algorithms): "
                                     "repeatable to the bit on GPUs, somewhat slower")


@dataclass(frozen=True)
class OutputCfg:
    dir: str = opt("out", "where checkpoints and the final model are written", flag="--out")
    overwrite: bool = opt(False, "start a fresh run in an output dir that already holds a run")


@dataclass(frozen=True)
class InferCfg:
    prompt: Optional[str] = opt(None, "text to continue; default: all of stdin")
    max_new_tokens: int = opt(100, "tokens to generate at most", min=1)
    temperature: float = opt(0.8, "sampling temperature (0 = greedy)", min=0)
    top_k: int = opt(50, "sample from the k most likely tokens (0 = all)", min=0)
    top_p: float = opt(1.0, "nucleus sampling mass, in (0, 1]", above=0, at_most=1)
    greedy: bool = opt(False, "always take the most likely token (deterministic)")
    seed: Optional[int] = opt(None, "seed for reproducible sampling")
    stop: list = opt([], "stop when one of these strings is generated (not printed); repeatable")
    each_line: bool = opt(False, "every stdin line is a prompt, answered in order (batched)")
    jsonl: bool = opt(False, "with --each-line: one JSON object per prompt (prompt, completion, token counts)")
    batch_size: int = opt(8, "prompts generated together: stdin lines with --each-line, requests with --serve "
                             "(1: one at a time)", min=1)
    chat: bool = opt(False, "apply the tokenizer's chat template to the prompt (as training rendered it) and stop at "
                            "its end of turn")
    system: Optional[str] = opt(None, "system message for --chat")
    serve: bool = opt(False, "serve the model over an OpenAI-compatible HTTP API (SERVE.py) instead of stdout")
    host: str = opt("127.0.0.1", "--serve: the address to listen on (0.0.0.0: every interface)")
    port: int = opt(8000, "--serve: the port to listen on", min=1, at_most=65535)
    api_key: Optional[str] = opt(None, "--serve: requests must send 'Authorization: Bearer KEY' (default: the "
                                 "LLM_MINI_API_KEY environment variable, else none)")
    max_waiting: int = opt(64, "--serve: requests that may wait for their turn; more are refused (503, "
                               "Retry-After)", min=1)


@dataclass(frozen=True)
class EvalCfg:
    stride: Optional[int] = opt(None, "sliding-window step for texts longer than the window (default: the window)",
                                min=1)
    window: Optional[int] = opt(None, "tokens the model sees at once (default: its context length)", min=2)
    batch_size: int = opt(8, "windows scored together", min=1)
    dump: Optional[str] = opt(None, "write per-token log-probabilities to this .jsonl or .npy file")
    dump_top_k: int = opt(0, "with --dump .jsonl: also the top-k token ids and log-probabilities", min=0)
    plot: Optional[str] = opt(None, "draw OUT/loss.png from OUT/metrics.jsonl of a training run and exit")


@dataclass(frozen=True)
class ExportCfg:
    format: Literal["onnx", "gguf", "pt2", "torchscript"] = opt(
        "onnx", "what to write: onnx (a folder that generates in onnxruntime), gguf (llama.cpp), pt2 (torch.export) "
                "or torchscript (deprecated in PyTorch)")
    out: Optional[str] = opt(None, "the folder (onnx) or file to write (default: the model path + -onnx / "
                                   "-QUANT.gguf / .pt2 / .pt)", flag="--out")
    quant: Optional[Literal["f32", "f16", "q8_0", "int8"]] = opt(
        None, "weight type - onnx: f32 (default) or int8 (matmul weights); gguf: f16 (default, as llama.cpp), f32 "
              "or q8_0, with norms, biases and position embeddings kept f32")
    overwrite: bool = opt(False, "replace an existing --out file (once the new one is verified)")
    min_agreement: Optional[float] = opt(None, "gguf f16/q8_0, onnx int8: the share of next-token predictions the "
                                               "runtime must pick as PyTorch does; default 0.99 (lower it for small "
                                               "models that quantisation moves more)", min=0, at_most=1)


@dataclass(frozen=True)
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    tokenizer: TokenizerCfg = field(default_factory=TokenizerCfg)
    data: DataCfg = field(default_factory=DataCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    training: TrainingCfg = field(default_factory=TrainingCfg)
    output: OutputCfg = field(default_factory=OutputCfg)
    infer: InferCfg = field(default_factory=InferCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    export: ExportCfg = field(default_factory=ExportCfg)


# ---------------------------------------------------------------- defaults by purpose

# What a run is for sets the settings the schema leaves unset (None); a value from YAML or a flag wins.
# Learning rates as peers use them: ~1e-3 to pretrain a small model (nanoGPT, litgpt), 5e-5 for a
# full fine-tune (run_clm / the Trainer; 1e-3 wrecks a pretrained model), 2e-4 for LoRA (TRL, QLoRA).
# Fine-tunes train one sample per document, as TRL, litgpt and axolotl do; pretraining packs.
PURPOSE_DEFAULTS = {"from scratch": {"training.learning_rate": 1e-3, "data.packing": True, "model.dropout": 0.0},
                    "full fine-tune": {"training.learning_rate": 5e-5, "data.packing": False},
                    "LoRA fine-tune": {"training.learning_rate": 2e-4, "data.packing": False},
                    # DPO: TRL's DPOConfig default (1e-6) for a full model; its LoRA example's 5e-6 with an adapter
                    "DPO": {"training.learning_rate": 1e-6, "data.packing": False},
                    "DPO with LoRA": {"training.learning_rate": 5e-6, "data.packing": False},
                    # GRPO: TRL's GRPOConfig default (1e-6); with an adapter ten times that, as TRL's LoRA guide
                    "GRPO": {"training.learning_rate": 1e-6},
                    "GRPO with LoRA": {"training.learning_rate": 1e-5}}
# training.max_length defaults to the model's context, but at most this: the fp32 logits of one micro-batch
# (batch x length x vocab) dominate activation memory (8 x 1024 x 49k vocab = 1.6 GB per copy); run_clm's
# block_size and TRL's max_length default to 1024 too.
MAX_LENGTH_CAP = 1024


def purpose(cfg):
    if cfg.model.from_scratch:
        return "from scratch"
    if cfg.training.dpo or cfg.training.grpo:
        name = "DPO" if cfg.training.dpo else "GRPO"
        return f"{name} with LoRA" if cfg.lora.enabled else name
    return "LoRA fine-tune" if cfg.lora.enabled else "full fine-tune"


def with_max_length(cfg, context):
    """cfg with training.max_length resolved against the model's context (by default the context, at most
    MAX_LENGTH_CAP), and the log line that says so (None when it was set)."""
    if (cfg.training.max_length or 0) > context:
        raise UserError(f"training.max_length: {cfg.training.max_length} is above the model's context of {context} "
                        "tokens - lower --max-length")
    if cfg.training.max_length:
        return cfg, None
    length = min(context, MAX_LENGTH_CAP)
    note = f"max_length {length}: the model's context of {context} tokens" + (
        f", capped at {MAX_LENGTH_CAP} (--max-length to change)" if context > length else "")
    return replaced(cfg, {"training.max_length": length}), note


def warmup_of(warmup_steps, total_steps):
    """training.warmup_steps as a count: whole steps, or below 1 a fraction of the run (rounded up, as the
    Trainer's warmup_ratio), so a short fine-tune still reaches its peak rate."""
    return int(warmup_steps) if warmup_steps >= 1 else math.ceil(warmup_steps * total_steps)


def objective(t):
    """sft, dpo or grpo: what the run trains for (TRAIN.OBJECTIVES)."""
    return "grpo" if t.grpo else "dpo" if t.dpo else "sft"


def rules(cfg):
    """Checks across values that the per-field ranges cannot express: a list of error messages."""
    t, errors = cfg.training, []
    if t.warmup_steps >= 1 and t.warmup_steps % 1:
        errors.append(f"training.warmup_steps: {t.warmup_steps} - give whole steps, or a fraction of the run below 1")
    if t.dpo and t.grpo:
        errors.append("training.dpo and training.grpo: a run has one objective - pass --dpo or --grpo")
    if t.grpo and not t.reward:
        errors.append("training.reward: --grpo needs at least one reward function - pass --reward FILE.py:NAME")
    if t.reward and not t.grpo:
        errors.append("training.reward: reward functions are for --grpo - add it, or drop --reward")
    if t.grpo and (cfg.data.val_files or cfg.data.val_fraction or t.save_best):
        errors.append("data.val_files / val_fraction, training.save_best: --grpo holds out no validation data - its "
                      "progress is in its rewards; drop them")
    if t.grpo and (t.batch_size * t.grad_accum) % t.num_generations:
        errors.append(f"training.batch_size x grad_accum ({t.batch_size} x {t.grad_accum}) must be a multiple of "
                      f"num_generations ({t.num_generations}): each process trains on whole groups of completions")
    return errors


TRAIN_SECTIONS = ("model", "tokenizer", "data", "lora", "training", "output")
INFER_SECTIONS = ("model", "infer")
EVAL_SECTIONS = ("model", "data", "eval")
EXPORT_SECTIONS = ("model", "export")
SCRIPTS = {"TRAIN.py": TRAIN_SECTIONS, "INFER.py": INFER_SECTIONS, "EVAL.py": EVAL_SECTIONS, "EXPORT.py": EXPORT_SECTIONS}


@dataclass(frozen=True)
class Resolved:
    """What load decided for the user, to say before anything runs."""
    summary: Optional[str]  # the first log line of a training run: the file read, what was dropped and chosen
    notes: dict             # {"section.key": why}: the values chosen for the user, marked in --print-config
    sections: tuple
    print_only: bool        # --print-config: print the config (print_config) instead of running


def load(argv, sections=TRAIN_SECTIONS, description=None, config_default="config.yaml", required=(), usage=""):
    """The script's Config from its command line, frozen, and what was decided for the user (Resolved).

    The order; each step overrides the ones before it only where it sets a value:
      1. the schema's defaults (the dataclasses above);
      2. the YAML file: --config PATH; or, for TRAIN.py, ./config.yaml (the default experiment), but only when
         the command names neither --config nor --model (a --model is the user's own run, not the demo);
      3. the flags; a --model flag without --from-scratch also drops the YAML's from_scratch, config_overrides and
         dropout (they shape a model built from scratch, not a pretrained one);
      4. the defaults of the run's purpose (PURPOSE_DEFAULTS) fill the settings still unset (None); --qlora
         sets lora.enabled;
      5. once the model is loaded, TRAIN.py resolves training.max_length against it (with_max_length).
    required: keys the YAML or flags must set (usage: an example command for the error)."""
    args = vars(FLAGS.make_parser(Config, sections, description, config_default).parse_args(argv))
    path, print_only = args.pop("config"), args.pop("print_config")
    args.pop("debug")  # main_guard reads --debug itself
    explicit = any(a == "--config" or a.startswith("--config=") for a in argv)
    skipped = path if not explicit and path and os.path.exists(path) and "model.name" in args else None
    path = path if explicit or (path and os.path.exists(path) and not skipped) else None
    raw, dropped = with_flags(FLAGS.read_yaml(path) if path else {}, args)
    missing = [k for k in required if k.split(".")[1] not in (raw.get(k.split(".")[0]) or {})]
    if missing:
        names = " and ".join(FLAGS.flag_of(sec, f) for sec, f, _ in leaves(sections) if f"{sec}.{f.name}" in missing)
        raise UserError(f"{names} {'is' if len(missing) == 1 else 'are'} required - e.g. {usage}")
    cfg = FLAGS.build(Config, raw, sections, f"{path} + flags" if path else "flags", rules)
    if "training" not in sections:
        return cfg, Resolved(None, {}, sections, print_only)
    cfg, chosen, notes = resolve_purpose(cfg)
    said = [f"config: {path}" if path else "config: built-in defaults"]
    unread = [f"{sec}.{k}" for sec, v in (FLAGS.read_yaml(skipped) if skipped else {}).items()
              if isinstance(v, dict) for k in v]
    said += [f"{skipped} not read, so its {', '.join(unread)} do not apply (--model names your own run; --config "
             f"{skipped} to use it)"] if skipped else []
    said += [f"dropped from {path}: {', '.join(dropped)} (--model without --from-scratch: a pretrained model)"] \
        if dropped else []
    said += [f"purpose: {purpose(cfg)}" + (f", so {chosen}" if chosen else "")]
    return cfg, Resolved(" | ".join(said), notes, sections, print_only)


def print_config(cfg, resolved):
    """--print-config: the resolved config as YAML on stdout, led by what was decided and with the values chosen
    for the user marked. -> exit code 0"""
    print((f"# {resolved.summary}\n" if resolved.summary else "") + dump(cfg, resolved.sections, resolved.notes), end="")
    return 0


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
    filled = {key: value for key, value in PURPOSE_DEFAULTS[purpose(cfg)].items()
              if getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) is None}
    cfg = replaced(cfg, filled)
    chosen = ", ".join([f"{k.split('.')[1]}={yaml.safe_dump(v).split(chr(10))[0]}" for k, v in filled.items()]
                       + (["lora enabled (--qlora)"] if implied else []))
    notes = implied | {k: f"{purpose(cfg)} default" for k in filled}
    if cfg.training.max_length is None:
        notes["training.max_length"] = f"the model's context, at most {MAX_LENGTH_CAP}"
    return cfg, chosen, notes


def leaves(sections):
    return FLAGS.leaves(Config, sections)


def to_dict(cfg, sections=TRAIN_SECTIONS):
    return FLAGS.to_dict(cfg, sections)


def dump(cfg, sections=TRAIN_SECTIONS, notes=None):
    return FLAGS.dump(cfg, sections, notes)


def main(argv):
    """python CONFIG.py --reference | --print-config [flags]"""
    if argv == ["--reference"]:
        print(FLAGS.markdown(Config, SCRIPTS), end="")
        return 0
    cfg, resolved = load(argv, description=__doc__)
    if resolved.print_only:
        return print_config(cfg, resolved)
    log(resolved.summary)
    return 0


if __name__ == "__main__":
    main_guard(main)
