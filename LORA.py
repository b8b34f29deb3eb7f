"""LoRA and QLoRA through peft: adapters on a model to train (every linear layer but the output head, by
default), the 4-bit NF4 base of QLoRA, and an adapter directory (adapter_config.json) attached to its base
for use. Merging an adapter into its base is peft's merge_and_unload (TRAIN.py --merge, EXPORT.py)."""
import importlib.util
import json
import os
import warnings

import torch
from safetensors import SafetensorError
from transformers import BitsAndBytesConfig

from REPORT import UserError, first_line, need

ADAPTER = "adapter_config.json"


def is_adapter(path):
    return os.path.exists(os.path.join(path, ADAPTER))


def base_of(path, base_model=None):
    """The base model of the adapter directory `path`: base_model if given, else the one its config names."""
    base = base_model or json.load(open(os.path.join(path, ADAPTER))).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path}/{ADAPTER}: names no base model - pass --base-model DIR")
    return base


def attach(model, path, trainable=False):
    """The adapter directory `path` loaded onto its base `model` (a peft PeftModel)."""
    try:
        return peft("a LoRA adapter directory").PeftModel.from_pretrained(model, path, is_trainable=trainable)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise UserError(f"{path}: could not load the LoRA adapter onto {model.name_or_path} ({first_line(e, 160)})")


def quantization(lcfg, device):
    """QLoRA's 4-bit NF4 base (double quantisation, bf16 compute), or None."""
    if not lcfg.qlora:
        return None
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--qlora needs a CUDA GPU and `pip install bitsandbytes` (4-bit NF4 base) - "
                        "--lora works here, on any device")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def add_lora(model, lcfg, base):
    """peft's LoraConfig + get_peft_model; only the adapter parameters are trainable."""
    p = peft("LoRA")
    if lcfg.qlora:
        model = p.prepare_model_for_kbit_training(model)
    # peft's all-linear: every linear layer but the output head (GPT-2's c_attn/c_proj/c_fc, llama's
    # q/k/v/o and gate/up/down projections, phi3's fused qkv_proj/gate_up_proj alike)
    targets = lcfg.target_modules or ["all-linear"]
    config = p.LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, bias=lcfg.bias,
                          target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    try:
        model = p.get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"lora.target_modules: {targets} ({first_line(e, 160)}) - name modules of "
                        f"{model.config.model_type}, or all-linear")
    # name the base so the adapter directory loads on its own (INFER.py, EVAL.py, peft)
    model.peft_config["default"].base_model_name_or_path = os.path.abspath(base) if os.path.exists(base) else base
    return model


def peft(feature):
    """The peft package, for `feature`. peft asks models through transformers' old is_gradient_checkpointing
    name, which warns on every call: that one warning is dropped."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    return need("peft", feature)
