"""What the backward pass recomputes instead of keeping from the forward (training.recompute).

A decoder layer's forward leaves behind more than the weights, gradients and AdamW state together (SmolLM2-135M
at 2 x 1024, fp32: about 99 MB a layer, 2.9 GB for 30 layers), and most of it is element-wise results: the
normalised hidden states, SiLU(gate) and SiLU(gate) * up, the rotary products, dtype casts. Those cost almost
nothing to compute again; the matmuls and attention that produced their inputs do not.

- "cheap" (the default): selective activation checkpointing (torch.utils.checkpoint with a policy) around each
  decoder layer: the outputs of matmuls and of attention are kept, everything else (and LoRA's rank-r
  matmuls) is recomputed from them in backward. The same kernels run on the same inputs, so the loss and every gradient are the model's own.
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


def apply(model, mode):
    """Set the model (the raw transformers or peft model, before any wrapping) to recompute in backward as
    `mode` says. -> a line for the log saying what changed"""
    if mode == "none":
        return "recompute: none (autograd keeps every activation)"
    if not getattr(model, "supports_gradient_checkpointing", False):
        return f"recompute: none ({type(model).__name__} has no checkpointable layers)"
    kwargs = {"use_reentrant": False}
    if mode == "cheap":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    layers = sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())
    what = ("element-wise results (norms, activations, rotary, casts); matmul and attention outputs kept"
            if mode == "cheap" else "the whole layer; its input kept")
    return f"recompute: {mode}: {layers} layers recompute {what} in backward (--recompute none: keep everything)"
