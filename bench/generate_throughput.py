"""Generation speed of INFER.py in each precision against bare transformers, onnxruntime and llama.cpp, on one
model and one prompt, in one run, with each row's share of what the machine's memory bandwidth allows.

    python bench/generate_throughput.py --model DIR [--new-tokens 128] [--batch 8] [--repeats 3]

Rows, each greedy from the same prompt, EOS masked so that every runtime generates exactly --new-tokens:
  INFER.py f32 / bf16 / int8: GENERATE.generate, what INFER.py and the server run, on the model GENERATE.load
      loads with --dtype float32 / bfloat16 / int8 (bf16 and int8 only where the CPU has native bf16), eager
      (INFER.py's default; fp32 and bf16 packed for oneDNN, PACK.py) and "compiled" (--decode compiled, the
      server's default: DECODE.py, on plain weights; its compile, timed once in the warm-up, is printed apart;
      batches of several rows run eager, so no batch figure);
  transformers f32: a bare model.generate(do_sample=False) on the fp32 model as transformers loads it;
  onnxruntime f32 / int8: ONNX_RUN.generate on EXPORT.py's ONNX folders (where onnxruntime is installed);
  llama.cpp f32 / f16 / q8_0: llama-cpp-python on EXPORT.py's GGUF files (where it is installed), the
      precision that matches INFER.py's f32 / bf16 / int8.
Columns: tokens/s of one stream (median of --repeats, interleaved), of --batch streams at once (INFER.py and
transformers), time to the first token (a 1-token generation), how many tokens equal transformers f32's (after
the first difference the texts part), INFER.py's next-token agreement with that text (teacher-forced), the
bytes of weights read per token, and the fraction of the floor: (bytes per token x tokens/s) / the machine's
read bandwidth, measured here as torch.sum over a 1 GiB fp32 tensor (best of 5, all threads).
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import CONFIG  # noqa: E402
import DECODE  # noqa: E402
import DEVICE  # noqa: E402
import GENERATE  # noqa: E402
from MODEL import context_length, load_for_use  # noqa: E402
from TOKENIZER import load_tokenizer  # noqa: E402

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
EOS = [None]  # the tokenizer's EOS, masked in the onnxruntime and llama.cpp loops


def read_bandwidth():
    """Bytes per second this machine reads: torch.sum over 1 GiB of fp32, all threads, best of 5."""
    x = torch.ones(2**28)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times[1:])


def weight_bytes(model):
    """Bytes a decoding step reads: every weight once, the input embedding but one row (a tied head reads it whole;
    a packed head, PACK.py, reads its own copy, a buffer)."""
    embed = model.get_input_embeddings().weight
    tied = getattr(model.get_output_embeddings(), "weight", None) is embed
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not embed or tied}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def infer_run(model, tok, ids, n, batch, compiled=None):
    no_eos = [model.config.vocab_size]  # an id outside the output: no end token, exactly n new tokens
    opts = GENERATE.Options(n, GENERATE.sampling_of(True, 0, 0, 1), [], no_eos)
    answers = GENERATE.generate(model, tok, [GENERATE.Row(ids, opts) for _ in range(batch)], compiled)
    return answers[0].new_ids


def next_token_agreement(model, ids, reference):
    """The share of the reference continuation's tokens the model predicts itself, each from the reference text
    before it (teacher-forced, one forward pass): the check EXPORT.py makes of a quantised export."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids + reference[:-1]])).logits[0, len(ids) - 1:]  # (len(reference), vocab)
    return float((logits.argmax(-1) == torch.tensor(reference)).float().mean())


def bare_run(model, tok, ids, n, batch):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids] * batch), attention_mask=torch.ones(batch, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, len(ids):].tolist()


def exports(model_dir, tmp, skip):
    """{name: (runner(ids, n) -> tokens, bytes per token)} for onnxruntime and llama.cpp, where installed."""
    runners = {}
    if "onnx" not in skip and importlib.util.find_spec("onnxruntime"):
        import ONNX_RUN
        for quant in ("f32", "int8"):
            folder = os.path.join(tmp, f"onnx-{quant}")
            export(model_dir, ["--format", "onnx", "--quant", quant, "--out", folder] +
                   (["--min-agreement", "0"] if quant == "int8" else []))
            session = ONNX_RUN.load(folder, threads=os.cpu_count())[0]
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if "onnx" in f)
            runners[f"onnxruntime {quant}"] = (lambda ids, n, s=session: list(ONNX_RUN.generate(
                s, ids, n, set(), no_eos_argmax)), size)
    if "gguf" not in skip and importlib.util.find_spec("llama_cpp"):
        import llama_cpp
        for quant in ("f32", "f16", "q8_0"):
            path = os.path.join(tmp, f"m-{quant}.gguf")
            export(model_dir, ["--format", "gguf", "--quant", quant, "--out", path] +
                   ([] if quant == "f32" else ["--min-agreement", "0"]))
            llm = llama_cpp.Llama(model_path=path, n_ctx=2048, verbose=False, n_threads=os.cpu_count())
            runners[f"llama.cpp {quant}"] = (lambda ids, n, llm=llm: cpp_run(llm, ids, n), os.path.getsize(path))
    return runners


def no_eos_argmax(logits):  # (vocab,) numpy: the most likely token that is not an end token (EOS masked)
    logits = logits.copy()
    logits[EOS[0]] = -float("inf")
    return int(logits.argmax())


def export(model_dir, args):
    subprocess.run([sys.executable, os.path.join(ROOT, "EXPORT.py"), "--model", model_dir, *args], check=True,
                   capture_output=True)


def cpp_run(llm, ids, n):
    import llama_cpp
    eos = llm.token_eos()

    def no_eos(_, scores):
        scores[eos] = -float("inf")
        return scores
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True, logits_processor=llama_cpp.LogitsProcessorList([no_eos])):
        out.append(t)
        if len(out) == n:
            return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "out"))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["onnx", "gguf"], help="runtimes to leave out")
    a = p.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(a.model)
    ids, EOS[0] = tok(PROMPT).input_ids, tok.eos_token_id
    dtypes = ["float32"] + (["bfloat16", "int8"] if DEVICE.cpu_has_native_bf16() else [])
    models = {d: GENERATE.load(CONFIG.ModelCfg(name=a.model, device="cpu", dtype=d), False)[0] for d in dtypes}
    plains = {d: GENERATE.load(CONFIG.ModelCfg(name=a.model, device="cpu", dtype=d), True)[0] for d in dtypes}
    plain = load_for_use(CONFIG.ModelCfg(name=a.model, device="cpu", dtype="float32"), "generate")
    n = min(a.new_tokens, context_length(models["float32"].config) - len(ids))
    rows = {f"INFER.py {SHORT[d]}": (lambda b, k, m=models[d]: infer_run(m, tok, ids, k, b), weight_bytes(models[d]))
            for d in dtypes}
    steps = {d: DECODE.compiled_step(plains[d]) for d in dtypes}  # the same sdpa outside the compiled step
    rows.update({f"INFER.py {SHORT[d]} compiled": (lambda b, k, m=plains[d], s=steps[d]: infer_run(m, tok, ids, k, b, s),
                                                   weight_bytes(plains[d])) for d in dtypes})
    rows["transformers f32"] = (lambda b, k: bare_run(plain, tok, ids, k, b), weight_bytes(plain))
    tmp = tempfile.mkdtemp()
    for name, (run, size) in exports(a.model, tmp, a.skip).items():
        rows[name] = (lambda b, k, run=run: run(ids, k), size)
    compile_s = {}
    for name, (run, _) in rows.items():  # warm-up: first calls allocate, load kernels, build sessions, compile
        t = time.perf_counter()
        run(1, 2)
        compile_s[name] = time.perf_counter() - t
    single, batch, first, tokens = {}, {}, {}, {}
    for _ in range(a.repeats):  # interleaved, so drift in the machine's load hits every row alike
        for name, (run, _) in rows.items():
            t = time.perf_counter()
            tokens[name] = run(1, n)
            single.setdefault(name, []).append(time.perf_counter() - t)
            t = time.perf_counter()
            run(1, 1)  # time to the first token: the prompt read, one token out
            first.setdefault(name, []).append(time.perf_counter() - t)
            if name.startswith(("INFER.py", "transformers")) and not name.endswith("compiled"):
                t = time.perf_counter()
                run(a.batch, n)
                batch.setdefault(name, []).append(time.perf_counter() - t)
    med = statistics.median
    bandwidth = read_bandwidth()
    print(f"{a.model}: prompt {len(ids)} tokens, {n} new tokens, greedy, median of {a.repeats}, {os.cpu_count()} "
          f"threads, torch {torch.__version__}; read bandwidth {bandwidth / 1e9:.1f} GB/s (torch.sum, 1 GiB)")
    ref = tokens["transformers f32"]
    agree = {f"INFER.py {SHORT[d]}": f"{next_token_agreement(models[d], ids, ref):.1%}" for d in dtypes}
    print("compiling the decoding step (the warm-up's first call): " + ", ".join(
        f"{name} {compile_s[name]:.0f} s" for name in rows if name.endswith("compiled")))
    print(f"{'runtime':<22}{'tok/s':>8}{f'x{a.batch} tok/s':>13}{'first ms':>10}{'same tokens':>13}{'next token':>12}"
          f"{'MB/token':>10}{'of floor':>10}")
    for name, (_, size) in rows.items():
        speed = n / med(single[name])
        many = f"{a.batch * n / med(batch[name]):.0f}" if name in batch else "-"
        same = sum(x == y for x, y in zip(tokens[name], ref))
        print(f"{name:<22}{speed:>8.1f}{many:>13}{med(first[name]) * 1e3:>10.0f}{f'{same}/{n}':>13}"
              f"{agree.get(name, '-'):>12}{size / 1e6:>10.0f}{size * speed / bandwidth:>10.0%}")


SHORT = {"float32": "f32", "bfloat16": "bf16", "int8": "int8"}

if __name__ == "__main__":
    main()
