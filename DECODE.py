"""The compiled decoding step (--decode compiled; the server's default): one answer at a time, transformers'
generate runs its one-token step through torch.compile, with a pre-allocated (static) KV cache.

Why it is faster: decoding a token multiplies one row of activations by every weight matrix, so its speed is how
fast the weights are read. PyTorch's CPU matmul (MKL) does a one-row product on one core, reading the weights at
about 16 GB/s on the 2-core AMD EPYC of docs/performance.md. Inductor's decompose_mm_pass writes each one-row
matmul as multiply-and-sum, which inductor compiles into one vectorised loop over the weight on every core (about
40 GB/s there); the compiled step also drops the Python between PyTorch's kernels. Its sums run in another order,
so logits differ from eager's in the last bits: greedy text is the same as transformers.generate's where no two
tokens are that close (tests/test_decode.py; bench/generate_throughput.py counts the tokens).

What it costs: compiling, once a process (30-60 s for a 135M model on 2 cores; inductor keeps what it built on
disk, in TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor_$USER, so later runs take 10-25 s). Several answers
generated together use the eager step: the one-row rewrite does not apply to them, and MKL's matmul of several
rows is what batching is for.
"""
import torch
from transformers import CompileConfig, StaticCache

SHORTEST_CACHE = 256  # tokens: caches come in powers of two from here


def chosen(decode, serving, dtype):
    """Whether answers decode compiled: --decode compiled, or auto when serving (a process that runs for long pays
    the compile once, as it starts), except with int8 weights, which PyTorch's int8 kernel multiplies in either
    step at the same speed (docs/performance.md)."""
    return decode == "compiled" or (decode == "auto" and serving and dtype != "int8")


def compile_config():
    """transformers' CompileConfig for generate's one-token step."""
    # decompose_mm_pass reads its size limits when inductor first loads, so they are set before the first compile;
    # 1 << 20 lets it take the output head too (576 x 49152 in SmolLM2, past its default 2048).
    torch._inductor.config.post_grad_fusion_options["decompose_mm_pass"] = {
        "cpu_max_other_dimension_decomposition": 1 << 20}
    # Dynamo checks every parameter before each step (about 1.5 ms a token of SmolLM2): its guard filters could
    # skip that, but then a second model in the process could run through the first one's graph. No CUDA graphs
    # (mode="reduce-overhead"): each answer's cache is new, and CUDA graphs want the same tensors every call.
    config = CompileConfig(dynamic=True, mode="default")  # dynamic: one compile serves every cache length
    config._compile_all_devices = True  # generate compiles only on GPUs unless this is set
    return config


def static_cache(model, tokens, context):
    """A pre-allocated KV cache for one row of `tokens` (prompt and answer): the next power of two from 256, at
    most the context. Each step attends to all of it, so it is sized to the answer, not to the context."""
    length = max(SHORTEST_CACHE, 1 << (tokens - 1).bit_length())
    return StaticCache(config=model.config, max_cache_len=min(context, length))
