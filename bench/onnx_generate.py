"""What an ONNX export buys on CPU: onnxruntime's generation speed, f32 and int8, against PyTorch on the same model.

    pip install onnx onnxruntime onnxscript
    python bench/onnx_generate.py --model DIR [--new-tokens 128] [--repeats 3]

Exports DIR with EXPORT.py --format onnx, f32 and int8 (each verified as usual; int8 with --min-agreement 0, so
the table shows its agreement instead of refusing it), then times greedy generation of --new-tokens tokens after
one prompt, in this process, interleaved, median of --repeats:
  baseline: PyTorch fp32, model.generate(do_sample=False) with the KV cache (what INFER.py --greedy runs);
  onnxruntime: ONNX_RUN.generate, the loop generate.py runs, the same prompt;
  genai f32: onnxruntime-genai's generator on the f32 folder, where onnxruntime-genai is installed.
EOS is masked on both sides, so both produce exactly N tokens. Prints tokens/s, the ratio to the baseline, the
size of the weights, and how many of the N tokens equal PyTorch's.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(ROOT, "out"))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import onnxruntime
    import torch
    import ONNX_RUN
    from MODEL import context_length, load_pretrained
    from TOKENIZER import load_tokenizer
    model, tok = load_pretrained(a.model, torch.float32).eval(), load_tokenizer(a.model)
    ids = tok(PROMPT).input_ids
    n = min(a.new_tokens, context_length(model.config) - len(ids))
    tmp = tempfile.mkdtemp()
    sessions, export_s = {}, {}
    for quant in ("f32", "int8"):
        folder = os.path.join(tmp, f"onnx-{quant}")
        t = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "EXPORT.py"), "--model", a.model, "--format", "onnx",
                        "--quant", quant, "--out", folder, *(["--min-agreement", "0"] if quant == "int8" else [])],
                       check=True, capture_output=True)
        export_s[quant] = time.perf_counter() - t
        sessions[quant] = ONNX_RUN.load(folder, threads=os.cpu_count())[0]

    def torch_run():
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        return out[0, len(ids):].tolist()

    def no_eos(logits):  # as min_new_tokens does on the PyTorch side: exactly n tokens on both
        logits = logits.copy()
        logits[tok.eos_token_id] = -np.inf
        return int(np.argmax(logits))

    try:  # optional: onnxruntime-genai's own loop (C++) on the f32 folder, where it is installed
        import onnxruntime_genai as og
        genai = og.Model(os.path.join(tmp, "onnx-f32"))
    except ImportError:
        genai = None

    def genai_run():
        params = og.GeneratorParams(genai)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        generator = og.Generator(genai, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        return list(generator.get_sequence(0))[len(ids):]

    runs = {"pytorch fp32": torch_run, **{q: lambda q=q: list(ONNX_RUN.generate(sessions[q], ids, n, set(), no_eos))
                                         for q in sessions}, **({"genai f32": genai_run} if genai else {})}
    times = {k: [] for k in runs}
    outputs = {}
    for _ in range(a.repeats):  # interleaved, so drift in machine load hits every side alike
        for name, fn in runs.items():
            t = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t)
    base = n / statistics.median(times["pytorch fp32"])
    print(f"{a.model}: {sum(x.numel() for x in model.parameters()) / 1e6:.1f}M parameters, prompt {len(ids)} "
          f"tokens, {n} new tokens, median of {a.repeats}, {os.cpu_count()} threads, onnxruntime "
          f"{onnxruntime.__version__}, {f'onnxruntime-genai {og.__version__}, ' if genai else ''}torch "
          f"{torch.__version__}")
    print(f"{'runtime':<18}{'tokens/s':>10}{'vs PyTorch':>12}{'weights MB':>12}{'same tokens':>14}{'export s':>10}")
    for name, ts in times.items():
        speed = n / statistics.median(ts)
        folder = os.path.join(tmp, f"onnx-{name}")
        size = "" if name not in sessions else \
            f"{sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if 'onnx' in f) / 1e6:.1f}"
        same = sum(x == y for x, y in zip(outputs[name], outputs["pytorch fp32"]))
        label = f"onnxruntime {name}" if name in sessions else name
        made = f"{export_s[name]:.0f}" if name in export_s else ""
        print(f"{label:<18}{speed:>10.0f}{speed / base:>11.2f}x{size:>12}{f'{same}/{n}':>14}{made:>10}")


if __name__ == "__main__":
    main()
