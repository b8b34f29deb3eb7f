"""The one config schema of LLM-MINI: every setting, its default, range and meaning; the defaults that depend
on what a run is for; the checks across settings; which sections each script reads.

Every setting is a field of a dataclass below; nothing else defines a setting. A field `training.batch_size`
is the YAML key `training: {batch_size: …}` and the flag `--batch-size` (or `--training.batch-size`).
Which value each setting takes in a run (defaults < YAML < flags < the purpose's defaults) is SETTINGS.py;
the generic machinery that turns a schema into YAML keys, flags and type checks is FLAGS.py.
"""
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from FLAGS import opt


@dataclass(frozen=True)
class ModelCfg:
    name: str = opt("gpt2", "local model directory, hub id, or (with from_scratch) an architecture: gpt2, llama, …",
                    flag="--model")
    from_scratch: bool = opt(False, "build a randomly initialised model of architecture `name`; "
                             "a --model on the command line without --from-scratch loads pretrained weights")
    config_overrides: dict = opt({}, "architecture settings for from_scratch, e.g. '{n_layer: 4, n_embd: 256}'")
    device: Literal["auto", "cuda", "mps", "cpu"] = opt("auto", "auto picks cuda, then mps, then cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = opt(
        "auto", "auto: bf16 on CUDA/CPUs with native bf16, fp16 on older CUDA, else fp32; int8: QUANT.py's weights")
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
    merge: bool = opt(False, "after training also write OUT/merged: base + adapter as one plain model", flag="--merge")


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
    eval_every: int = opt(0, "validation loss every N steps (0 = only at the end, when there is val data)", min=0)
    eval_batches: int = opt(20, "validation scores this many batches: the same evenly spread subset of the "
                                "validation sequences each time (0 = all of them)", min=0)
    save_best: bool = opt(False, "keep the checkpoint with the lowest validation loss in OUT/ckpt-best")
    eval_tasks: list = opt([], "benchmark tasks (lm-evaluation-harness, as EVAL.py --tasks) scored on rank 0 during "
                               "training; each score goes to metrics.jsonl and the trackers as tasks/TASK/METRIC")
    eval_tasks_every: int = opt(0, "score --eval-tasks every N steps (0 = only at the end)", min=0)
    eval_tasks_path: Optional[str] = opt(None, "--eval-tasks: a folder of task YAML files of your own")
    eval_tasks_limit: Optional[float] = opt(None, "--eval-tasks: at most N documents of each task (below 1: a share)",
                                            above=0)
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
    recompute: Literal["auto", "cheap", "all", "none"] = opt(
        "auto", "what backward recomputes instead of keeping (RECOMPUTE.py): auto = nothing, unless a micro-batch's "
        "activations would pass half the free memory, then cheap (or all); cheap = element-wise results, matmul and "
        "attention outputs kept (the same gradients, 0.6x the activation memory, some time); all = whole layers "
        "(gradient checkpointing: least memory, about a third more time); none = keep everything")
    deterministic: bool = opt(False, "deterministic algorithms only (torch.use_deterministic_algorithms): "
                                     "repeatable to the bit on GPUs, somewhat slower")


@dataclass(frozen=True)
class OutputCfg:
    dir: str = opt("out", "where checkpoints and the final model are written", flag="--out")
    overwrite: bool = opt(False, "start a fresh run in an output dir that already holds a run")
    report_to: list = opt([], "trackers that also receive the run's metrics and config (TRACKERS.py): tensorboard, "
                              "wandb, trackio, mlflow (default: none)", flag="--report-to")
    run_name: Optional[str] = opt(None, "the run's name in the trackers (default: the output folder's name and the "
                                        "time)", flag="--run-name")
    project: str = opt("llm-mini", "the trackers' project (W&B, trackio) or experiment (MLflow)", flag="--project")


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
    decode: Literal["auto", "compiled", "eager"] = opt(
        "auto", "a single answer's tokens: compiled (DECODE.py: 2-3x as fast on CPUs after a compile of 30-100 s) or "
                "eager; auto: compiled for --serve (compiled as it starts), eager for prompts")
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
    tasks: list = opt([], "benchmark tasks scored by lm-evaluation-harness (BENCHMARKS.py), e.g. hellaswag,arc_easy, "
                          "or your own in --include-path; replaces the perplexity report", flag="--tasks")
    num_fewshot: Optional[int] = opt(None, "--tasks: examples in each prompt (default: each task's own)", min=0)
    limit: Optional[float] = opt(None, "--tasks: score at most this many documents of each task (below 1: a share)",
                                 above=0)
    include_path: Optional[str] = opt(None, "--tasks: a folder of task YAML files of your own")


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
# training.max_length defaults to the model's context, but at most this, as run_clm's block_size and TRL's
# max_length: activations grow with the length (attention's time with its square), and a model's whole context
# (SmolLM2's 8192) is longer than most fine-tuning samples.
MAX_LENGTH_CAP = 1024


def objective(t):
    """sft, dpo or grpo: what the run trains for (TRAIN.OBJECTIVES)."""
    return "grpo" if t.grpo else "dpo" if t.dpo else "sft"


def purpose(cfg):
    if cfg.model.from_scratch:
        return "from scratch"
    if objective(cfg.training) != "sft":
        return objective(cfg.training).upper() + (" with LoRA" if cfg.lora.enabled else "")
    return "LoRA fine-tune" if cfg.lora.enabled else "full fine-tune"


def warmup_of(warmup_steps, total_steps):
    """training.warmup_steps as a count: whole steps, or below 1 a fraction of the run (rounded up, as the
    Trainer's warmup_ratio), so a short fine-tune still reaches its peak rate."""
    return int(warmup_steps) if warmup_steps >= 1 else math.ceil(warmup_steps * total_steps)


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # --report-to: what TRACKERS.py reports to
# the weight types each export format offers, its default first; and those checked by agreement, not equality
EXPORT_QUANTS = {"onnx": ("f32", "int8"), "gguf": ("f16", "f32", "q8_0"), "pt2": (), "torchscript": ()}
QUANTISED = {("onnx", "int8"), ("gguf", "f16"), ("gguf", "q8_0")}


def quant_of(e):
    """export.quant, or by default the format's first weight type (None: a format without a choice)."""
    return e.quant or next(iter(EXPORT_QUANTS[e.format]), None)


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
    if t.eval_tasks and t.fsdp:
        errors.append("training.eval_tasks: scored on rank 0 alone, which FSDP's sharded model cannot do - score the "
                      "saved model with EVAL.py --tasks instead")
    unknown = [name for name in cfg.output.report_to if name not in TRACKERS]
    if unknown:
        errors.append(f"output.report_to: {', '.join(unknown)} - choose from {', '.join(TRACKERS)}")
    e, quants = cfg.export, EXPORT_QUANTS[cfg.export.format]
    if e.quant is not None and e.quant not in quants:
        errors.append(f"--quant {e.quant} does not apply to --format {e.format} - " + (
            f"choose one of {', '.join(quants)}" if quants else "drop it"))
    elif e.min_agreement is not None and (e.format, quant_of(e)) not in QUANTISED:
        errors.append("--min-agreement applies to --format gguf --quant f16/q8_0 and --format onnx --quant int8 - "
                      "drop it, or choose one of those")
    return errors


TRAIN_SECTIONS = ("model", "tokenizer", "data", "lora", "training", "output")
INFER_SECTIONS = ("model", "infer")
EVAL_SECTIONS = ("model", "data", "eval")
EXPORT_SECTIONS = ("model", "export")
SCRIPTS = {"TRAIN.py": TRAIN_SECTIONS, "INFER.py": INFER_SECTIONS, "EVAL.py": EVAL_SECTIONS, "EXPORT.py": EXPORT_SECTIONS}
