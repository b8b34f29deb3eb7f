"""Linear layers with their weights packed for oneDNN, for generating on a CPU in fp32 or bf16: each weight is
reordered once, as the model loads, into the blocked layout oneDNN's matmul reads (torch.ops.mkldnn, the kernels
inductor calls for frozen CPU graphs), and every product after that reads it as it lies.

Why: PyTorch's default CPU matmul for fp32 (MKL) packs the weight again on every call and multiplies a few rows
on one core: on the 2-core AMD EPYC of docs/performance.md it reads SmolLM2's weights at 9-16 GB/s, oneDNN's
packed product at 20-50 GB/s. Eager fp32 generation of SmolLM2-135M runs about 2x faster, one answer or eight
together, and so does the prompt's forward pass; bf16 about 1.5x. The sums run in oneDNN's order, so logits differ
from MKL's in the last bits (greedy text is the same where no two tokens are that close: tests/test_pack.py,
bench/generate_throughput.py counts the tokens).

What it costs: packing takes well under a second; memory, once loaded, nothing where a weight is only a linear
layer's (the packed copy replaces it; while loading, the safetensors file's pages stay resident until the last
layer is packed, so the peak is higher); a model whose output head shares the embedding's weight (tied) keeps
both, one vocabulary x hidden matrix more. The compiled decoding step (DECODE.py) multiplies plain weights in its own loops
(inductor cannot take a packed tensor as a graph input), so a model that decodes compiled is not packed; a server
that decodes compiled packs a twin for its batches (GENERATE.for_batches)."""
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class PackedLinear(nn.Module):
    """y = x @ weight^T + bias, in place of a Linear (weight (out, in)) or GPT-2's Conv1D (weight (in, out)), with
    the weight held in oneDNN's layout (`packed`)."""

    def __init__(self, weight, bias):  # weight: (out, in)
        super().__init__()
        # batch_size 8: the layout for a few rows (decoding); measured as fast for one row and for a prompt's 300
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 8),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x):  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packable(model, native_bf16):
    """Whether the model generates faster packed: it has plain linear layers (an int8 model's are already
    quantized), on a CPU with oneDNN, in fp32, or in bf16 where the CPU computes bf16 natively (elsewhere oneDNN's
    bf16 is emulated)."""
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or dtype == torch.bfloat16 and native_bf16) and any(
        type(module) in (nn.Linear, Conv1D) for module in model.modules())


def to_packed(model, own=True):
    """Every linear layer of the model (its output head too) as a PackedLinear, in place; `own`: the model is the
    only user of its other tensors, which are copied out of safetensors' memory map. -> the model"""
    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) in (nn.Linear, Conv1D)]
    for parent, name in swaps:  # one at a time, each plain weight freed as its packed copy is made
        child = getattr(parent, name)
        weight = child.weight.T if isinstance(child, Conv1D) else child.weight
        setattr(parent, name, PackedLinear(weight, child.bias))
        del child, weight
    for param in model.parameters() if own else ():  # safetensors maps fp32 weights from their file: the rest
        param.data = param.data.clone()                # copied out, so that the map, and its pages, are released
    return model
