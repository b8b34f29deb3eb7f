"""What a GGUF export buys on CPU: llama.cpp's generation speed per weight type, against PyTorch on the same model.

    pip install gguf llama-cpp-python
    python bench/gguf_generate.py --model DIR [--new-tokens 128] [--repeats 3]

Exports DIR to GGUF f32, f16 and q8_0 with EXPORT.py (each verified as usual), then times greedy generation of
--new-tokens tokens after one prompt, in this process, interleaved, median of --repeats:
  baseline: PyTorch fp32, model.generate(do_sample=False) with the KV cache (what INFER.py --greedy runs);
  llama.cpp: llama-cpp-python, top_k=1, the same prompt.
EOS is masked on both sides, so both produce exactly N tokens.
Prints tokens/s, the ratio to the baseline, the file size, and how many of the N tokens equal PyTorch's.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(ROOT, "out"))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import llama_cpp
    import torch
    from MODEL import load_pretrained
    from TOKENIZER import load_tokenizer
    model, tok = load_pretrained(a.model, torch.float32).eval(), load_tokenizer(a.model)
    ids = tok(PROMPT).input_ids
    n = min(a.new_tokens, getattr(model.config, "max_position_embeddings", 2048) - len(ids))
    tmp = tempfile.mkdtemp()
    llms = {}
    for quant in ("f32", "f16", "q8_0"):
        path = os.path.join(tmp, f"m-{quant}.gguf")
        subprocess.run([sys.executable, os.path.join(ROOT, "EXPORT.py"), "--model", a.model, "--format", "gguf",
                        "--quant", quant, "--out", path, *([] if quant == "f32" else ["--min-agreement", "0"])],
                       check=True, capture_output=True)
        llms[quant] = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + n + 8, verbose=False,
                                      n_threads=os.cpu_count())

    def torch_run():
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        return out[0, len(ids):].tolist()

    def no_eos(_, scores):  # as min_new_tokens does on the PyTorch side: exactly n tokens on both
        scores[tok.eos_token_id] = -float("inf")
        return scores

    def cpp_run(llm):
        llm.reset()
        out = []
        greedy = dict(top_k=1, temp=0.0, reset=True, logits_processor=llama_cpp.LogitsProcessorList([no_eos]))
        for t in llm.generate(ids, **greedy):
            out.append(t)
            if len(out) == n:
                break
        return out

    times = {k: [] for k in ["pytorch fp32", *llms]}
    outputs = {}
    for _ in range(a.repeats):  # interleaved, so drift in machine load hits every side alike
        for name in times:
            t = time.perf_counter()
            outputs[name] = torch_run() if name == "pytorch fp32" else cpp_run(llms[name])
            times[name].append(time.perf_counter() - t)
    base = n / statistics.median(times["pytorch fp32"])
    print(f"{a.model}: {sum(x.numel() for x in model.parameters()) / 1e6:.1f}M parameters, prompt {len(ids)} "
          f"tokens, {n} new tokens, median of {a.repeats}, {os.cpu_count()} threads, llama-cpp-python "
          f"{llama_cpp.__version__}, torch {torch.__version__}")
    print(f"{'runtime':<16}{'tokens/s':>10}{'vs PyTorch':>12}{'file MB':>10}{'same tokens':>14}")
    for name, ts in times.items():
        speed = n / statistics.median(ts)
        size = "" if name == "pytorch fp32" else f"{os.path.getsize(os.path.join(tmp, f'm-{name}.gguf')) / 1e6:.1f}"
        same = sum(x == y for x, y in zip(outputs[name], outputs["pytorch fp32"]))
        label = name if name == "pytorch fp32" else f"llama.cpp {name}"
        print(f"{label:<16}{speed:>10.0f}{speed / base:>11.2f}x{size:>10}{f'{same}/{n}':>14}")


if __name__ == "__main__":
    main()
