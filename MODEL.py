"""How models are built: a local Hugging Face directory, a hub id, or a fresh model from scratch;
plus the choice of device and precision. Nothing here trains or generates."""
import importlib.util
import json
import logging
import os
import socket
import threading
import urllib.parse
import warnings

import torch
import transformers
from huggingface_hub import constants, try_to_load_from_cache
from safetensors import SafetensorError
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

from CONFIG import UserError, first_line, log, need, suggest

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
    if name == "float16" and device.type == "cpu" and purpose == "train":
        raise UserError("--dtype float16 is not supported for training on CPU - use bfloat16 or float32")
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
        log("warning: --dtype bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX): matmuls run about 30x "
            "slower than float32 here - use --dtype float32 (or auto)")
    return DTYPES[name]


def load_for_use(mcfg, purpose):
    """The one way INFER.py ("generate"), EVAL.py ("score") and EXPORT.py ("export") load a model: a local
    directory, hub id, .gguf file or LoRA adapter directory, in the precision --dtype means for the purpose,
    on its device (model.device), in eval mode. Its tokenizer: TOKENIZER.load_tokenizer(mcfg.name)."""
    check_source(mcfg.name)
    device = pick_device(mcfg.device)
    check_attention(mcfg.attn_implementation, device)
    model = load_pretrained(mcfg.name, pick_dtype(mcfg.dtype, device, purpose), base_model=mcfg.base_model,
                            attn_implementation=mcfg.attn_implementation, trust_remote_code=mcfg.trust_remote_code)
    if purpose != "export":  # an exported graph keeps the model's own modules
        fuse_activations(model)
    return model.to(device).eval()


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face Hub answers a TCP connect within `timeout` s (DNS included, which can hang)."""
    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(constants.ENDPOINT)
    result = []

    def connect():
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            result.append(True)
        except OSError:
            pass
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result)


def from_pretrained_args(name):
    """(where, extra kwargs) for transformers' from_pretrained: a .gguf file is read from its folder with
    gguf_file= (transformers dequantises it as it loads); anything else is passed as it is."""
    if name.endswith(".gguf"):
        return os.path.dirname(name) or ".", {"gguf_file": os.path.basename(name)}
    return name, {}


def check_source(name, what="model"):
    """Fail fast, in one line, when `name` is neither a usable local directory or .gguf file nor a reachable hub id.
    Called once per name, before anything loads from it (offline, the hub probe can take seconds)."""
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise UserError(f"{name}: no such GGUF file - check the path")
        need("gguf", f"{name}: reading a GGUF file")
        return
    if os.path.isdir(name):
        if what == "model" and os.path.exists(os.path.join(name, "generate.py")) and \
                os.path.exists(os.path.join(name, "model.onnx")):
            raise UserError(f"{name}: is an ONNX export, which runs in onnxruntime - python {name}/generate.py "
                            "--prompt TEXT (or export from the model directory it came from)")
        if what == "model" and not any(os.path.exists(os.path.join(name, f)) for f in ("config.json", ADAPTER)):
            raise UserError(f"{name}: is not a model directory (no config.json) - pass a directory written by "
                            "TRAIN.py or save_pretrained, or a hub id")
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.splitext(name)[1] != ""
    if looks_local or os.path.exists(name):
        raise UserError(f"{name}: no such {what} directory - check the path (or give a hub id like gpt2)")
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # already in the local hub cache: loads offline
    if not hub_reachable():
        raise UserError(f"{name}: not a local directory, and the Hugging Face Hub is unreachable (offline?) - "
                        "pass a local model directory, or train from scratch with --model gpt2 --from-scratch")


ADAPTER = "adapter_config.json"


def build_model(mcfg, lcfg, tokenizer, device, seed):
    """The model to train, with fp32 master weights (autocast does the low-precision math); LoRA adapters
    on a pretrained base when lcfg.enabled (its source checked already: check_source)."""
    check_attention(mcfg.attn_implementation, device)
    kw = dict(attn_implementation=mcfg.attn_implementation, trust_remote_code=mcfg.trust_remote_code)
    if lcfg.enabled and mcfg.from_scratch:
        raise UserError("--lora adapts a pretrained model - pass --model DIR or a hub id without --from-scratch")
    if not mcfg.from_scratch and mcfg.dropout is not None:
        raise UserError("model.dropout: sets a from-scratch model's dropout; a pretrained model keeps its own "
                        "(change it in its config.json) - drop --dropout")
    if not mcfg.from_scratch:
        model = load_pretrained(mcfg.name, torch.float32, quantization_config=quantization(lcfg, device), **kw)
        return add_lora(model, lcfg, mcfg.name) if lcfg.enabled else model
    if os.path.isdir(mcfg.name):
        config = AutoConfig.from_pretrained(mcfg.name, trust_remote_code=mcfg.trust_remote_code)
    elif mcfg.name in CONFIG_MAPPING:
        config = AutoConfig.for_model(mcfg.name)
    else:
        raise UserError(f"model.name: '{mcfg.name}' is not an architecture for from_scratch"
                        f"{suggest(mcfg.name, list(CONFIG_MAPPING.keys()))} (e.g. gpt2, llama, mistral, qwen2)")
    for key, value in config.to_dict().items():  # resid_pdrop, attention_dropout, hidden_dropout_prob, ...
        if mcfg.dropout is not None and type(value) in (int, float) and (key.endswith("dropout") or key.endswith("pdrop")):
            setattr(config, key, mcfg.dropout)
    for key, value in mcfg.config_overrides.items():
        if not hasattr(config, key):  # HF configs accept any key silently; a typo must not be ignored
            raise UserError(f"model.config_overrides: '{key}' is not a setting of {config.model_type}"
                            f"{suggest(key, list(config.to_dict()))}")
        setattr(config, key, value)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)  # the initial weights are a function of the seed alone
    try:
        model = AutoModelForCausalLM.from_config(config, **kw)
        model.loss_type = "ForCausalLM"  # silences transformers' "loss_type=None" warning; same loss
    except (ValueError, TypeError, AssertionError) as e:
        raise UserError(f"model.config_overrides: {mcfg.config_overrides} do not make a valid "
                        f"{config.model_type} ({first_line(e)})")
    return model


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


def load_pretrained(path, dtype, base_model=None, trainable=False, **kw):
    """AutoModelForCausalLM.from_pretrained with one-line errors for missing, foreign or corrupt files (`path`
    checked already: check_source). A LoRA adapter directory loads its base (from adapter_config.json, or
    base_model) plus the adapter."""
    if os.path.exists(os.path.join(path, ADAPTER)):
        base = base_model or json.load(open(os.path.join(path, ADAPTER))).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}/{ADAPTER}: names no base model - pass --base-model DIR")
        check_source(base)
        model = load_pretrained(base, dtype, **kw)
        try:
            return peft("a LoRA adapter directory").PeftModel.from_pretrained(model, path,
                                                                                       is_trainable=trainable)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            raise UserError(f"{path}: could not load the LoRA adapter onto {base} ({first_line(e, 160)})")
    transformers.logging.disable_progress_bar()  # no "Loading weights" bar: stderr is for our own messages
    where, gguf = from_pretrained_args(path)
    kw = {k: v for k, v in kw.items() if v is not None} | gguf
    try:
        if gguf:
            kw["config"] = AutoConfig.from_pretrained(where, **gguf)
            if kw["config"].model_type == "gpt2":  # transformers maps GGUF's context_length to n_ctx, not n_positions
                kw["config"].n_positions = kw["config"].n_ctx
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
        model.loss_type = getattr(model, "loss_type", None) or "ForCausalLM"
        if gguf:  # dequantised into plain tensors: save it like any model (a fine-tune from a GGUF)
            model.hf_quantizer = None
            model.config.__dict__.pop("quantization_config", None)
        return model
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise UserError(f"{path}: could not load the model ({first_line(e, 200)}) - the files may be "
                        "corrupt or truncated: copy them again or use another checkpoint")


def fuse_activations(model):
    """Swap in the fused kernel where an activation has an exactly equivalent one: GPT-2's gelu_new (and
    gelu_fast) is the tanh GELU written out in seven element-wise ops, F.gelu(approximate="tanh") is one kernel,
    forward and backward. Only the modules change: the config still says gelu_new, so a saved model loads in
    plain transformers as before. -> how many were swapped"""
    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) in (NewGELUActivation, FastGELUActivation)]
    for parent, name in swaps:
        setattr(parent, name, GELUTanh())
    return len(swaps)


def peft(feature):
    """The peft package, for `feature`. peft asks models through transformers' old is_gradient_checkpointing
    name, which warns on every call: that one warning is dropped."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    return need("peft", feature)


def no_padding_warning():
    """Batches carry position ids and no attention mask (BATCHES.collate), which transformers takes for unmasked
    padding whenever a row starts or ends with the pad id (GPT-2 pads with EOS, which ends every document):
    that one warning is dropped, nothing else."""
    logging.getLogger("transformers.modeling_utils").addFilter(lambda r: "attention_mask" not in r.getMessage())


def keeps_documents_apart(model, device):
    """Whether the model attends within each packed document only: the second of two packed documents must
    get the logits it gets alone (transformers builds a block-diagonal mask from restarting position ids
    in the architectures that use its masking utilities; one that does not would mix documents)."""
    ids = torch.arange(2, 10, device=device)[None] % model.config.vocab_size
    training = model.training
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=ids[:, 4:], use_cache=False).logits
        packed = model(input_ids=ids, position_ids=torch.arange(4, device=device).repeat(1, 2), use_cache=False).logits
    model.train(training)
    return torch.allclose(alone.float(), packed[:, 4:].float(), atol=1e-4, rtol=1e-4)


def check_attention(impl, device):
    """Allow flash_attention_2 only where it runs: a CUDA device (any index: cuda:N under torchrun) with the
    flash-attn package installed."""
    if impl == "flash_attention_2" and (device.type != "cuda" or importlib.util.find_spec("flash_attn") is None):
        raise UserError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and "
                        "`pip install flash-attn` - use sdpa (the default) otherwise")


def context_length(config):
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
