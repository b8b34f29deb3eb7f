"""Export a trained model for another runtime, and prove the file works there before saying so.

    python EXPORT.py --model out --format onnx --out model.onnx          # checked with onnxruntime
    python EXPORT.py --model out --format torchscript --out model.pt     # checked with torch.jit.load
    python EXPORT.py --model out --format gguf --quant q8_0 --out m.gguf # checked in llama.cpp + transformers

ONNX and TorchScript map (input_ids, attention_mask), both (batch, seq) int64, to logits (batch, seq, vocab),
with dynamic batch and sequence sizes, checked on several inputs of different lengths with padding.
GGUF holds the weights and the tokenizer in llama.cpp's layout (gpt2 and llama architectures), checked by
reading it back with transformers and, when llama-cpp-python is installed, by generating with llama.cpp.
A LoRA adapter directory is merged into its base first. A failed check is an error, never a silent success.
"""
import os
import subprocess
import sys
import tempfile

import CONFIG
from CONFIG import UserError, log


def need(module, pip_name):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this export needs {pip_name} - pip install {pip_name}")


def logits_module(model):
    """The model as a plain (input_ids, attention_mask) -> logits module, without a KV cache."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return Logits(model).eval()


def examples(vocab, seed=0):
    """Inputs of several shapes, each with a right-padded row, so the export is checked on padding too."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch, seq in [(2, 7), (1, 3), (3, 19), (2, 33)]:
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, seq // 2:] = 0 if batch > 1 else 1
        out.append((ids, mask))
    return out


def masked_max_diff(a, b, mask):
    """Largest |a - b| over real (unpadded) positions: logits at padding are not defined."""
    return float(((a - b).abs().amax(-1) * mask).max())


def export_torchscript(module, inputs, path):
    import torch
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs[0], check_trace=False)
    traced.save(path)
    # verify in a fresh process, as a user of the file would load it: torch only, no transformers
    with tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():
            torch.save([(i, m, module(i, m)) for i, m in inputs], os.path.join(tmp, "cases.pt"))
        code = ("import sys, torch\n"
                "m = torch.jit.load(sys.argv[1])\n"
                "cases = torch.load(sys.argv[2], weights_only=True)\n"
                "print(max(float(((m(i, a) - ref).abs().amax(-1) * a).max()) for i, a, ref in cases))")
        r = subprocess.run([sys.executable, "-c", code, path, os.path.join(tmp, "cases.pt")], capture_output=True,
                           text=True)
    if r.returncode:
        raise UserError(f"{path}: torch.jit.load in a fresh process failed ({r.stderr.strip().splitlines()[-1]})")
    return float(r.stdout), 1e-5, "torch.jit.load in a fresh process"


def export_onnx(module, inputs, path):
    import torch
    need("onnxscript", "onnxscript")
    ort = need("onnxruntime", "onnxruntime")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with torch.no_grad():
        torch.onnx.export(module, inputs[0], path, dynamo=True, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], verbose=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = []
    for ids, mask in inputs:
        got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        with torch.no_grad():
            diffs.append(masked_max_diff(got, module(ids, mask), mask))
    return max(diffs), 1e-4, "onnxruntime (CPUExecutionProvider)"


# --- GGUF: llama.cpp's file, written the way its own convert_hf_to_gguf.py writes it ---------------------------
PROMPTS = ["The", "Once upon a time, there was", "It is a truth universally acknowledged that",
           "1, 2, 3, 4,", "\n\nChapter"]
PASSAGES = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
            "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
            "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
            "considered the rightful property of some one or other of their daughters.",
            "def add(a, b):\n    return a + b\n\nprint(add(2, 40))  # 42, UPPER lower\témigré naïve <|endoftext|>"]
FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def check_gguf_arch(c):
    """Only what llama.cpp's gpt2 / llama graphs compute; anything else would export silently wrong."""
    rope = getattr(c, "rope_parameters", None) or {}
    problem = {"gpt2": c.model_type == "gpt2" and (
                   c.activation_function not in ("gelu_new", "gelu_pytorch_tanh") and f"activation {c.activation_function}"
                   or c.scale_attn_by_inverse_layer_idx and "scale_attn_by_inverse_layer_idx"
                   or not c.scale_attn_weights and "scale_attn_weights false"),
               "llama": c.model_type == "llama" and (
                   c.hidden_act != "silu" and f"activation {c.hidden_act}"
                   or rope.get("rope_type", "default") != "default" and f"rope scaling {rope.get('rope_type')}")}
    if c.model_type not in problem:
        raise UserError(f"--format gguf: architecture {c.model_type} is not supported - gpt2 and llama are "
                        "(use --format onnx or torchscript)")
    if problem[c.model_type]:
        raise UserError(f"--format gguf: this {c.model_type} uses {problem[c.model_type]}, which llama.cpp's "
                        f"{c.model_type} does not compute - use --format onnx or torchscript")


def rope_permute(w, n_head):
    """HF's llama rotates the two halves of each head; llama.cpp rotates adjacent pairs: reorder q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, gguf):
    """(GGUF name, float32 numpy array) for every weight, in llama.cpp's layout."""
    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[c.model_type.upper()], c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when the file has no output tensor
        t = t.detach().float().cpu()
        if c.model_type == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.T  # GPT-2's Conv1D stores (in, out); ggml, like nn.Linear, wants (out, in)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = rope_permute(t, c.num_attention_heads)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            t = rope_permute(t, c.num_key_value_heads)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"--format gguf: the tensor {name} has no llama.cpp name - this {c.model_type} variant "
                            "is not supported")
        yield new, t.contiguous().numpy()


def gguf_type(name, array, quant, gguf):
    """llama.cpp's converter's choice: vectors (norms, biases) and position embeddings stay f32; q8_0 needs
    rows that split into blocks of 32, else f16."""
    T = gguf.GGMLQuantizationType
    if array.ndim < 2 or quant == "f32" or name.startswith("position_embd"):
        return T.F32
    return T.Q8_0 if quant == "q8_0" and array.shape[-1] % 32 == 0 else T.F16


def pre_tokenizer(tok_json):
    """llama.cpp's name for the pre-tokenizer (the regex that splits text before BPE), or None."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    byte_level = parts[-1].get("type") == "ByteLevel" and not parts[-1].get("add_prefix_space")
    llama3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
              "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    if byte_level and len(parts) == 1 and parts[0].get("use_regex", True):
        return "gpt-2"
    if byte_level and len(parts) == 2 and parts[0] == {"type": "Digits", "individual_digits": True}:
        return "smollm"
    if byte_level and len(parts) == 2 and parts[0].get("pattern", {}).get("Regex") == llama3:
        return "llama-bpe"
    return None


def gguf_vocab(w, tokenizer, vocab_size, gguf):
    """The tokenizer, embedded: tokens by id, their types, BPE merges, special ids, chat template."""
    import json
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe, pre = tok_json["model"], pre_tokenizer(tok_json)
    if bpe["type"] != "BPE" or bpe.get("byte_fallback") or (tok_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError("--format gguf: only byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3 style) are supported")
    if pre is None:
        raise UserError(f"--format gguf: llama.cpp has no known name for this pre-tokenizer "
                        f"({json.dumps(tok_json.get('pre_tokenizer'))[:120]}) - it would split text differently")
    T = gguf.TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens = [added[i].content if i in added else by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [(T.CONTROL if added[i].special else T.USER_DEFINED) if i in added else
             T.NORMAL if i in by_id else T.UNUSED for i in range(vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]])
    ids = tokenizer("a").input_ids
    w.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    w.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id] and len(ids) > 1)
    for kind in ("bos", "eos", "unk", "pad"):
        if getattr(tokenizer, f"{kind}_token_id") is not None:
            getattr(w, {"unk": "add_unk_token_id", "pad": "add_pad_token_id"}.get(kind, f"add_{kind}_token_id"))(
                getattr(tokenizer, f"{kind}_token_id"))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        w.add_chat_template(tokenizer.chat_template)


def quant_roundtrip(name, array, quant, gguf):
    """The values a reader gets back for `array` stored at `quant`."""
    qtype = gguf_type(name, array, quant, gguf)
    return gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).reshape(array.shape)


def write_gguf(model, tokenizer, path, quant, name):
    gguf = need("gguf", "gguf")
    from MODEL import context_length
    c = model.config
    check_gguf_arch(c)
    w = gguf.GGUFWriter(path, c.model_type)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType[FILE_TYPE[quant]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(context_length(c))
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    if c.model_type == "gpt2":
        w.add_feed_forward_length(c.n_inner or 4 * c.hidden_size)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_vocab_size(c.vocab_size)
    gguf_vocab(w, tokenizer, c.vocab_size, gguf)
    for tensor_name, array in gguf_tensors(model, gguf):
        qtype = gguf_type(tensor_name, array, quant, gguf)
        w.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def greedy_torch(model, ids, n, eos):
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids):].tolist()


def verify_gguf(model, tokenizer, path, quant, min_agreement):
    """Read the file back with transformers (weights and tokenizer must be what was written), then, where
    llama-cpp-python is installed, run it in llama.cpp: tokens, greedy continuations, top-1 agreement."""
    import numpy as np
    import torch
    import gguf
    from MODEL import context_length, load_pretrained
    from TOKENIZER import load_tokenizer
    back = load_pretrained(path, torch.float32)
    written, got = dict(gguf_tensors(model, gguf)), dict(gguf_tensors(back, gguf))
    if sorted(written) != sorted(got):
        raise UserError(f"{path}: verification failed - transformers reads back other tensors: "
                        f"{sorted(set(written) ^ set(got))[:4]}")
    diff = max(float(np.abs(quant_roundtrip(name, a, quant, gguf) - got[name]).max()) for name, a in written.items())
    if diff != 0:
        raise UserError(f"{path}: verification failed - transformers reads back weights that differ by {diff:.2e}")
    texts = PROMPTS + PASSAGES
    back_tok = load_tokenizer(path)
    if [back_tok(t).input_ids for t in texts] != [tokenizer(t).input_ids for t in texts]:
        raise UserError(f"{path}: verification failed - the embedded tokenizer, read back by transformers, "
                        "splits text differently")
    checks = ["transformers read it back: weights identical to those written, same tokenization"]
    try:
        import llama_cpp
    except ImportError:
        log("llama.cpp check skipped: pip install llama-cpp-python to run the file in llama.cpp as part of the export")
        return checks
    n_ctx = min(context_length(model.config), 512)
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=os.cpu_count())
    eos, same, agree, total = tokenizer.eos_token_id, 0, 0, 0
    for text in texts:
        if llm.tokenize(text.encode(), add_bos=False, special=True) != tokenizer(text).input_ids:
            raise UserError(f"{path}: verification failed - llama.cpp tokenizes {text!r} differently")
    forced = [tokenizer(p).input_ids[:n_ctx] for p in PASSAGES]
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        want = greedy_torch(model, ids, min(32, n_ctx - len(ids)), eos)
        llm.reset()
        llm.eval(ids)
        got = []
        while len(got) < len(want) and (not got or got[-1] != eos):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(got[-1:])
        same += got == want
        forced.append(ids + want)
    for seq in forced:  # top-1 agreement, teacher-forced, so that one early difference does not cascade
        llm.reset()
        llm.eval(seq)
        with torch.no_grad():
            ref = model(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits[0]
        agree += int((np.argmax(llm.scores[:len(seq)], -1) == ref.argmax(-1).numpy()).sum())
        total += len(seq)
    ok = same == len(PROMPTS) if quant == "f32" else agree / total >= min_agreement
    line = (f"llama.cpp {llama_cpp.__version__}: same tokenization of {len(texts)} texts; greedy continuations "
            f"identical for {same}/{len(PROMPTS)} prompts; next-token top-1 agreement {agree}/{total} = {agree / total:.2%}")
    if not ok:
        raise UserError(f"{path}: verification failed - {line}; needed " + (
            "identical continuations in f32" if quant == "f32" else f"--min-agreement {min_agreement}: "
            f"{quant} moves this model's predictions more - use --quant f16/f32, or lower --min-agreement"))
    return checks + [line]


def main(argv):
    cfg, flags, _ = CONFIG.load(argv, CONFIG.EXPORT_SECTIONS, description=__doc__, config_default=None)
    if "model.name" not in flags:
        raise UserError("--model is required: a directory written by TRAIN.py (e.g. --model out)")
    e = cfg.export
    for key in ("export.quant", "export.min_agreement"):
        if key in flags and e.format != "gguf":
            raise UserError(f"--{key[7:].replace('_', '-')} applies to --format gguf only - drop it, or add --format gguf")
    stem = cfg.model.name.rstrip("/").removesuffix(".gguf")
    path = e.out or stem + {"onnx": ".onnx", "torchscript": ".pt", "gguf": f"-{e.quant}.gguf"}[e.format]
    if os.path.abspath(path) == os.path.abspath(cfg.model.name):
        raise UserError(f"--out {path}: is the model being exported - write to another file")

    import torch
    from MODEL import load_pretrained
    model = load_pretrained(cfg.model.name, torch.float32, base_model=cfg.model.base_model,
                            attn_implementation="eager" if e.format == "torchscript" else cfg.model.attn_implementation,
                            trust_remote_code=cfg.model.trust_remote_code)
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter: fold it into the base first
        model = model.merge_and_unload()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if e.format == "gguf":
        from TOKENIZER import load_tokenizer
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
        write_gguf(model.eval(), tokenizer, path, e.quant, os.path.basename(stem))
        checks = verify_gguf(model, tokenizer, path, e.quant, e.min_agreement)
        log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, gguf {e.quant}); verified: " + "; ".join(checks))
        return
    module = logits_module(model.eval())
    inputs = examples(model.config.vocab_size)
    diff, tolerance, how = {"onnx": export_onnx, "torchscript": export_torchscript}[e.format](module, inputs, path)
    if not diff <= tolerance:
        raise UserError(f"{path}: verification failed - {how} differs from PyTorch by {diff:.2e} "
                        f"(allowed {tolerance:.0e}); the file is not trustworthy")
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {e.format}); verified with {how} on "
        f"{len(inputs)} inputs of different lengths with padding: max |logit difference| {diff:.2e} <= {tolerance:.0e}")


if __name__ == "__main__":
    CONFIG.main_guard(main)
