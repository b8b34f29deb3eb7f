"""What the backward pass recomputes instead of keeping from the forward (training.recompute).

A decoder layer's forward leaves behind more than the weights, gradients and AdamW state together (SmolLM2-135M
at 2 x 1024, fp32: about 99 MB a layer, 2.9 GB for 30 layers), and most of it is element-wise results: the
normalised hidden states, SiLU(gate) and SiLU(gate) * up, the rotary products, dtype casts. Those cost almost
nothing to compute again; the matmuls and attention that produced their inputs do not. Recomputing anything
still costs time (on a CPU, up to a third of a small model's step), so it is worth it only where memory is short.

- "auto" (the default): keep everything unless the activations of a micro-batch would take more than half the
  memory left (choose, from the model's shape and the device's free memory); then "cheap", or "all" where even
  "cheap" would not fit.
- "cheap": selective activation checkpointing (torch.utils.checkpoint with a policy) around each decoder
  layer: the outputs of matmuls and of attention are kept, everything else (and LoRA's rank-r matmuls) is
  recomputed from them in backward. The same kernels run on the same inputs, so the loss and every gradient
  are the model's own.
- "all": gradient checkpointing: only each layer's input is kept and the whole layer runs again in backward
  (least memory, about a third more time).
- "none": autograd keeps what it keeps.

Both go through transformers' activation checkpointing (each GradientCheckpointingLayer), so DDP, FSDP, LoRA
and torch.compile see one module call as before.
"""
import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers.modeling_layers import GradientCheckpointingLayer

aten = torch.ops.aten
# the outputs kept by "cheap": what is expensive to recompute, attention (with its log-sum-exp) and matmuls
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default}
MATMULS = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1}  # op: the left arg
# ... but not a matmul with an inner dimension this small, such as a LoRA adapter's up-projection (rank r): it
# costs r multiply-adds per output element to recompute, and its output is as large as the layer's own
CHEAP_INNER = 64


def policy(ctx, op, *args, **kwargs):
    keep = op in ATTENTION or op in MATMULS and args[MATMULS[op]].shape[-1] > CHEAP_INNER
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def apply(model, mode, why=""):
    """Set the model (the raw transformers or peft model, before any wrapping) to recompute in backward as
    `mode` says (why: the reason, for the log). -> a line for the log saying what changed"""
    why = f" ({why})" if why else ""
    if mode == "none":
        return f"recompute: none, autograd keeps every activation{why}"
    if not getattr(model, "supports_gradient_checkpointing", False):
        return f"recompute: none ({type(model).__name__} has no checkpointable layers)"
    kwargs = {"use_reentrant": False}
    if mode == "cheap":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    layers = sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())
    what = ("element-wise results (norms, activations, rotary, casts); matmul and attention outputs kept"
            if mode == "cheap" else "the whole layer; its input kept")
    return f"recompute: {mode}: {layers} layers recompute {what} in backward{why}"


# What one token of one decoder layer leaves for backward, in values of the hidden and intermediate sizes:
# keeping everything, the norms' inputs and outputs, q/k/v, attention's output, the residual stream and the
# MLP's gate, up and activation; "cheap", the matmul and attention outputs; "all", the layer's input.
PER_TOKEN_LAYER = {"none": (10, 4), "cheap": (7, 2), "all": (1, 0)}


def activation_bytes(config, tokens, mode):
    """About what the forward of `tokens` tokens keeps for backward in `mode`, at 4 bytes a value (fp32; autocast's
    mix of fp32 and bf16 keeps less). For SmolLM2-135M's shape at 2 x 1024 this says 2.9, 1.7 and 0.14 GB;
    bench/activation_memory.py measures 2.9, 1.7 and 0.27 GB (the last with one layer recomputing)."""
    c = config.get_text_config()
    hidden, layers = c.hidden_size, c.num_hidden_layers
    inner = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
    per_hidden, per_inner = PER_TOKEN_LAYER[mode]
    return 4 * tokens * layers * (per_hidden * hidden + per_inner * inner)


def choose(mode, config, tokens, free_bytes, held_bytes):
    """The mode to run, and why. An explicit mode is kept. "auto" keeps everything, the fastest, unless its
    activations would take more than half the memory left once the gradients and AdamW's state are allocated
    (held_bytes; the other half is room for backward's temporaries); then "cheap" if its activations fit so,
    else "all". free_bytes None (unknown): keep everything."""
    if mode != "auto":
        return mode, "--recompute " + mode
    if free_bytes is None:
        return "none", "auto: this device does not say how much memory is free, so everything is kept"
    budget = (free_bytes - held_bytes) / 2
    need = {m: activation_bytes(config, tokens, m) for m in ("none", "cheap")}
    said = f"{tokens} tokens a micro-batch keep ~{need['none'] / 1e6:,.0f} MB of activations"
    if need["none"] <= budget:
        return "none", f"auto: {said}, within half the {budget * 2 / 1e6:,.0f} MB left for them"
    pick = "cheap" if need["cheap"] <= budget else "all"
    return pick, f"auto: {said}, more than half the {budget * 2 / 1e6:,.0f} MB left for them"


def plan(t, model, free_bytes):
    """choose() for a run: its micro-batch's tokens (a DPO pair is two sequences), its model and trainable
    parameters (each with an fp32 gradient and AdamW's two moments: 12 bytes)."""
    tokens = t.batch_size * t.max_length * (2 if t.dpo else 1)
    held = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return choose(t.recompute, model.config, tokens, free_bytes, held)
