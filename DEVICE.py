"""Where and in what precision a model computes: the device that --device names (auto: CUDA, then MPS, then the
CPU), whether it runs bf16 math in hardware, what --dtype auto means for each purpose, and which attention
kernels it can run. Nothing here loads a model."""
import importlib.util

import torch

from REPORT import UserError, log

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def pick_device(name):
    """model.device as a torch.device: auto picks cuda, then mps, then cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch - use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here - use --device auto or cpu")
    return torch.device(name)


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware (training 1.1-1.6x faster than fp32, with the same
    loss: docs/training.md)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device):
    """Whether the device runs bf16 math in hardware: CUDA GPUs with bf16 (Ampere on), CPUs with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def auto_dtype(device_type, purpose, bf16):
    """What --dtype auto means, given whether the device has native bf16: to "train", autocast to bf16 where it
    has, else fp16 on CUDA (with the scaler), else fp32; to "generate" (INFER.py), bf16 weights on such a GPU,
    else fp32; to "score" (EVAL.py) and "export" (EXPORT.py), fp32, for exact numbers."""
    if purpose == "train":
        return torch.bfloat16 if bf16 and device_type in ("cuda", "cpu") else \
            torch.float16 if device_type == "cuda" else torch.float32
    return torch.bfloat16 if purpose == "generate" and bf16 and device_type == "cuda" else torch.float32


def pick_dtype(name, device, purpose):
    """The precision that --dtype names, for a purpose on a torch.device (auto: auto_dtype). Asking for bf16 on a
    CPU without native bf16 gets a warning; fp16 training on a CPU is refused."""
    if name == "auto":
        return auto_dtype(device.type, purpose, native_bf16(device))
    if name == "int8":  # weights int8, activations bf16 (QUANT.py): for generating and scoring only
        if purpose in ("train", "export"):
            raise UserError("--dtype int8 is for INFER.py and EVAL.py - train in bfloat16 or float32; EXPORT.py "
                            "writes int8 weights with --quant (gguf q8_0, onnx int8)")
        if not native_bf16(device):
            raise UserError(f"--dtype int8 multiplies int8 weights with bf16 activations, which this {device.type} "
                            "does not compute natively (no AVX512-BF16/AMX) - use --dtype float32, or EXPORT.py "
                            "--format gguf --quant q8_0 for llama.cpp")
        return torch.bfloat16
    if name == "float16" and device.type == "cpu" and purpose == "train":
        raise UserError("--dtype float16 is not supported for training on CPU - use bfloat16 or float32")
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
        log("warning: --dtype bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX): matmuls run about 30x "
            "slower than float32 here - use --dtype float32 (or auto)")
    return DTYPES[name]


def check_attention(impl, device):
    """Allow flash_attention_2 only where it runs: a CUDA device (any index: cuda:N under torchrun) with the
    flash-attn package installed."""
    if impl == "flash_attention_2" and (device.type != "cuda" or importlib.util.find_spec("flash_attn") is None):
        raise UserError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and "
                        "`pip install flash-attn` - use sdpa (the default) otherwise")


def free_memory(device, processes=1):
    """Bytes this process may still use on the device, or None where it cannot be told: a GPU's free memory
    (CUDA); on a CPU the memory the kernel reports available (/proc/meminfo's MemAvailable), shared by the
    `processes` of the run on this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kb * 1024 // processes
