"""The compiled decoding step (--decode compiled; the server's default): one answer at a time, transformers'
generate runs its one-token step through torch.compile, with a pre-allocated (static) KV cache.

Why it is faster: decoding a token multiplies one row of activations by every weight matrix, so its speed is how
fast the weights are read. PyTorch's CPU matmul (MKL) does a one-row product on one core, reading the weights at
about 16 GB/s on the 2-core AMD EPYC of docs/performance.md. Inductor's decompose_mm_pass writes each one-row
matmul as multiply-and-sum, which inductor compiles into one vectorised loop over the weight on every core (about
40 GB/s there). The step's attention compiles into the same graph (`attention`), and its C++ wrapper calls the
kernels one after another without Python between them. Its sums run in another order, so logits differ from
eager's in the last bits: greedy text is the same as transformers.generate's where no two tokens are that close
(tests/test_decode.py; bench/generate_throughput.py counts the tokens).

What it costs: compiling, once a process (about 100 s for a 135M model on 2 cores; inductor keeps what it built
on disk, in TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor_$USER, so later runs take about 30 s). Several answers
generated together use the eager step: the one-row rewrite does not apply to them, and a matmul of several rows
(oneDNN's, packed: PACK.py, GENERATE.for_batches) is what batching is for.
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface, CompileConfig, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SHORTEST_CACHE = 256  # tokens: caches come in powers of two from here
ATTENTION = "sdpa_compiled_math"  # the name `attention` is registered under in transformers' AttentionInterface


def chosen(decode, serving):
    """Whether answers decode compiled: --decode compiled, or auto when serving (a process that runs for long pays
    the compile once, as it starts)."""
    return decode == "compiled" or (decode == "auto" and serving)


def attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention; inside the compiled step through SDPA's math backend, which inductor compiles
    into the step with the rest. PyTorch's CPU flash-attention kernel, called from the graph for one query token,
    took 110 us a layer in bf16: 3.3 ms of SmolLM2's 14 ms token."""
    if not torch.compiler.is_compiling():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def compiled_step(model):
    """transformers' CompileConfig for generate's one-token step, with `model` made ready for it: a model on sdpa
    attention (the default) gets `attention`, the same sdpa outside the compiled step."""
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks sdpa takes
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(ATTENTION)
    # decompose_mm_pass reads its size limits when inductor first loads, so they are set before the first compile;
    # 1 << 20 lets it take the output head too (576 x 49152 in SmolLM2, past its default 2048).
    torch._inductor.config.post_grad_fusion_options["decompose_mm_pass"] = {
        "cpu_max_other_dimension_decomposition": 1 << 20}
    # Dynamo checks its guards before each step (about 8,000 for SmolLM2, 1-1.2 ms a token). With recursive dict
    # tags it checks each layer's module as one: while a module's __dict__ is unchanged (no weight, submodule or
    # flag set on it since) its guards are skipped, which halves the check; a second model, or a changed one, is
    # still checked in full. (skip_guard_eval_unsafe would skip the rest, and let an input the step was not
    # compiled for run through the wrong graph.)
    torch._dynamo.config.use_recursive_dict_tags_for_guards = True
    # No CUDA graphs (mode="reduce-overhead"): each answer's cache is new, and CUDA graphs want the same tensors
    # every call. dynamic: one compile serves every cache length; cpp_wrapper: the step's kernels called from C++
    # (1-1.5 ms a token less than inductor's Python wrapper, for a compile twice as long). realize_cpu_opcount_
    # threshold: the rotated query is computed once, not again inside the loop over the cache for each position
    # (inductor's default 50 fused it there: 30 us a layer, 0.9 ms of SmolLM2's int8 token, in sin and cos).
    config = CompileConfig(dynamic=True, mode=None,
                           options={"cpp_wrapper": True, "realize_cpu_opcount_threshold": 16})
    config._compile_all_devices = True  # generate compiles only on GPUs unless this is set
    return config


def static_cache(model, tokens, context):
    """A pre-allocated KV cache for one row of `tokens` (prompt and answer): the next power of two from 256, at
    most the context. Each step attends to all of it, so it is sized to the answer, not to the context."""
    length = max(SHORTEST_CACHE, 1 << (tokens - 1).bit_length())
    return StaticCache(config=model.config, max_cache_len=min(context, length))
