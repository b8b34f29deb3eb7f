"""GGUF, llama.cpp's file format: a model's weights and tokenizer written the way llama.cpp's own
convert_hf_to_gguf.py writes them (gpt2 and llama architectures; f32, f16, q8_0), and the checks that the
file reads back to what was written and runs in llama.cpp. Used by EXPORT.py --format gguf, which checks
that the optional gguf package is installed before importing this file."""
import json
import os

import gguf
import numpy as np
import torch

from MODEL import context_length, load_pretrained
from REPORT import UserError, log
from TOKENIZER import load_tokenizer

PROMPTS = ["The", "Once upon a time, there was", "It is a truth universally acknowledged that",
           "1, 2, 3, 4,", "\n\nChapter"]
PASSAGES = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
            "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
            "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
            "considered the rightful property of some one or other of their daughters.",
            "def add(a, b):\n    return a + b\n\nprint(add(2, 40))  # 42, UPPER lower\témigré naïve <|endoftext|>"]
FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def unsupported(c):
    """Why this model cannot be exported faithfully and checked, or None."""
    if c.model_type == "gpt2":
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):  # llama.cpp: tanh-approximated GELU
            return f"activation {c.activation_function}, which llama.cpp's gpt2 does not compute"
        if c.scale_attn_by_inverse_layer_idx or not c.scale_attn_weights:
            return "non-standard attention scaling, which llama.cpp's gpt2 does not compute"
    if c.model_type == "llama":
        if c.hidden_act != "silu":
            return f"activation {c.hidden_act}, which llama.cpp's llama does not compute"
        rope_type = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type != "default":
            return f"rope scaling {rope_type}, which this export does not write"
        if c.attention_bias or c.mlp_bias:
            return "bias tensors, which transformers' GGUF reader drops, so the file could not be checked"
    return None


def check_arch(c):
    if c.model_type not in ("gpt2", "llama"):
        raise UserError(f"--format gguf: architecture {c.model_type} is not supported - gpt2 and llama are "
                        "(use --format onnx or torchscript)")
    if unsupported(c):
        raise UserError(f"--format gguf: this {c.model_type} uses {unsupported(c)} - use --format onnx or torchscript")


def rope_permute(w, n_head):
    """HF's llama rotates the two halves of each head; llama.cpp rotates adjacent pairs: reorder q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(model):
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


def tensor_type(name, array, quant):
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


def write_vocab(w, tokenizer, vocab_size):
    """The tokenizer, embedded: tokens by id, their types, BPE merges, special ids, chat template."""
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
            getattr(w, f"add_{kind}_token_id")(getattr(tokenizer, f"{kind}_token_id"))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        w.add_chat_template(tokenizer.chat_template)


def roundtrip(name, array, quant):
    """The values a reader gets back for `array` stored at `quant`."""
    qtype = tensor_type(name, array, quant)
    return gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).reshape(array.shape)


def write(model, tokenizer, path, quant, name):
    """The GGUF file: architecture metadata, the tokenizer, then every tensor at its type."""
    c = model.config
    check_arch(c)
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
    write_vocab(w, tokenizer, c.vocab_size)
    for tensor_name, array in tensors(model):
        qtype = tensor_type(tensor_name, array, quant)
        w.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def greedy_torch(model, ids, n, eos):
    """PyTorch's greedy continuation of one prompt (token ids), as INFER.py --greedy makes it."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids):].tolist()


def verify(model, tokenizer, path, quant, min_agreement):
    """What was checked, one line each; a failed check raises. llama.cpp runs only where it is installed."""
    checks = [check_readback(model, tokenizer, path, quant)]
    try:
        import llama_cpp  # optional: the check in llama.cpp itself runs only where it is installed
    except ImportError:
        log("llama.cpp check skipped: pip install llama-cpp-python to run the file in llama.cpp as part of the export")
        return checks
    return checks + [check_llama_cpp(llama_cpp, model, tokenizer, path, quant, min_agreement)]


def check_readback(model, tokenizer, path, quant):
    """transformers' own GGUF reader must give back exactly the (rounded) weights and the same vocabulary."""
    written, got = dict(tensors(model)), dict(tensors(load_pretrained(path, torch.float32)))
    if sorted(written) != sorted(got):
        raise UserError(f"verification failed - transformers reads back other tensors: "
                        f"{sorted(set(written) ^ set(got))[:4]}")
    diff = max(float(np.abs(roundtrip(name, a, quant) - got[name]).max()) for name, a in written.items())
    if diff != 0:
        raise UserError(f"verification failed - transformers reads back weights that differ by {diff:.2e}")
    back_tok = load_tokenizer(path)
    if (back_tok.get_vocab(), back_tok.eos_token_id) != (tokenizer.get_vocab(), tokenizer.eos_token_id):
        raise UserError("verification failed - transformers reads back another vocabulary")
    differ = sum(back_tok(t).input_ids != tokenizer(t).input_ids for t in PROMPTS + PASSAGES)
    if differ:  # transformers' reader knows fewer pre-tokenizers than llama.cpp (not 'smollm', for one)
        log(f"note: transformers' GGUF reader splits {differ} of {len(PROMPTS + PASSAGES)} texts differently from "
            "this tokenizer (its pre-tokenizer is one the reader does not rebuild); llama.cpp is checked separately")
    return ("transformers read it back: weights identical to those written, same vocabulary"
            + ("" if differ else ", same tokenization"))


def check_llama_cpp(llama_cpp, model, tokenizer, path, quant, min_agreement):
    """In llama.cpp: the same tokens; f32 - PyTorch's greedy continuations exactly; f16/q8_0 - at least
    min_agreement of next-token choices equal to PyTorch's, teacher-forced so one early difference does not
    cascade."""
    n_ctx = min(context_length(model.config), 512)
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=os.cpu_count())
    eos, same, agree, total = tokenizer.eos_token_id, 0, 0, 0
    for text in PROMPTS + PASSAGES:
        if llm.tokenize(text.encode(), add_bos=False, special=True) != tokenizer(text).input_ids:
            raise UserError(f"verification failed - llama.cpp tokenizes {text!r} differently")
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
    for seq in forced:
        llm.reset()
        llm.eval(seq)
        with torch.no_grad():
            ref = model(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits[0]
        agree += int((np.argmax(llm.scores[:len(seq)], -1) == ref.argmax(-1).numpy()).sum())
        total += len(seq)
    line = (f"llama.cpp {llama_cpp.__version__}: same tokenization of {len(PROMPTS + PASSAGES)} texts; greedy "
            f"continuations identical for {same}/{len(PROMPTS)} prompts; next-token top-1 agreement {agree}/{total} "
            f"= {agree / total:.2%}")
    if not (same == len(PROMPTS) if quant == "f32" else agree / total >= min_agreement):
        raise UserError(f"verification failed - {line}; needed " + (
            "identical continuations in f32" if quant == "f32" else f"--min-agreement {min_agreement}: "
            f"{quant} moves this model's predictions more - use --quant f16/f32, or lower --min-agreement"))
    return line
