"""Weight-only int8 for generating and scoring (--dtype int8): each linear layer's weight as int8 with one scale per
output row (symmetric, rounded to nearest, as llama.cpp's q8_0 does for every 32 weights), multiplied by
PyTorch's own kernel for it, torch._weight_int8pack_mm, which scales inside the matmul. Decoding one token reads
every weight once, so a quarter of fp32's bytes is what makes it faster; activations stay bf16 (the kernel's
fast path: a device with native bf16). The model's text is close to, not the same as, fp32's: bench/
generate_throughput.py reports how many greedy tokens agree."""
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * row scale)^T + bias, in place of a Linear (weight (out, in)) or GPT-2's Conv1D
    (weight (in, out)); its name says what it holds, its forward returns what the layer it replaces returned."""

    def __init__(self, weight, bias, dtype):  # weight: (out, in)
        super().__init__()
        w = weight.detach().float().contiguous()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): the row's largest weight maps to 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.out_features, self.in_features = w.shape

    def forward(self, x):  # (..., in) -> (..., out)
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def to_int8(model, dtype):
    """Every linear layer of the model (its output head too; not the embeddings, read a row at a time) as an
    Int8Linear, in place. -> the model"""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, (nn.Linear, Conv1D))]
    for parent, name, child in swaps:
        weight = child.weight.T if isinstance(child, Conv1D) else child.weight
        setattr(parent, name, Int8Linear(weight, child.bias, dtype).to(child.weight.device))
    return model
