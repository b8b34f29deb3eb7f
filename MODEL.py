"""Where a model comes from and how it is built: a local Hugging Face directory, a .gguf file, a LoRA adapter
directory (LORA.py) or a hub id, checked before anything loads (offline, the hub is probed once); a fresh model
from scratch; and what the loop needs to know of a model (its context, whether packed documents stay apart).
Nothing here trains or generates."""
import logging
import os
import socket
import threading
import urllib.parse

import torch
import transformers
from huggingface_hub import constants, try_to_load_from_cache
from safetensors import SafetensorError
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

import DEVICE
import LORA
import QUANT
from REPORT import UserError, first_line, need, suggest


def load_for_use(mcfg, purpose):
    """The one way INFER.py ("generate"), EVAL.py ("score") and EXPORT.py ("export") load a model: a local
    directory, hub id, .gguf file or LoRA adapter directory, in the precision --dtype means for the purpose,
    on its device (model.device), in eval mode. Its tokenizer: TOKENIZER.load_tokenizer(mcfg.name)."""
    check_source(mcfg.name)
    device = DEVICE.pick_device(mcfg.device)
    DEVICE.check_attention(mcfg.attn_implementation, device)
    model = load_pretrained(mcfg.name, DEVICE.pick_dtype(mcfg.dtype, device, purpose), base_model=mcfg.base_model,
                            attn_implementation=mcfg.attn_implementation, trust_remote_code=mcfg.trust_remote_code)
    if purpose != "export":  # an exported graph keeps the model's own modules
        fuse_activations(model)
    if mcfg.dtype == "int8":  # a LoRA adapter first merged into its base: the int8 weights hold both
        model = QUANT.to_int8(model.merge_and_unload() if hasattr(model, "merge_and_unload") else model, torch.bfloat16)
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
        if what == "model" and not any(os.path.exists(os.path.join(name, f)) for f in ("config.json", LORA.ADAPTER)):
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


def build_model(mcfg, lcfg, tokenizer, device, seed):
    """The model to train, with fp32 master weights (autocast does the low-precision math); LoRA adapters
    on a pretrained base when lcfg.enabled (its source checked already: check_source)."""
    DEVICE.check_attention(mcfg.attn_implementation, device)
    kw = dict(attn_implementation=mcfg.attn_implementation, trust_remote_code=mcfg.trust_remote_code)
    if lcfg.enabled and mcfg.from_scratch:
        raise UserError("--lora adapts a pretrained model - pass --model DIR or a hub id without --from-scratch")
    if not mcfg.from_scratch and mcfg.dropout is not None:
        raise UserError("model.dropout: sets a from-scratch model's dropout; a pretrained model keeps its own "
                        "(change it in its config.json) - drop --dropout")
    if not mcfg.from_scratch:
        model = load_pretrained(mcfg.name, torch.float32, quantization_config=LORA.quantization(lcfg, device), **kw)
        return LORA.add_lora(model, lcfg, mcfg.name) if lcfg.enabled else model
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


def load_pretrained(path, dtype, base_model=None, trainable=False, **kw):
    """AutoModelForCausalLM.from_pretrained with one-line errors for missing, foreign or corrupt files (`path`
    checked already: check_source). A LoRA adapter directory loads its base (from adapter_config.json, or
    base_model) plus the adapter."""
    if LORA.is_adapter(path):  # the base it names (or base_model), then the adapter onto it
        base = LORA.base_of(path, base_model)
        check_source(base)
        return LORA.attach(load_pretrained(base, dtype, **kw), path, trainable)
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


def context_length(config):
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
