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
import dataclasses
import os
import subprocess
import sys
import tempfile

import torch

import CONFIG
from ATOMIC import fsync, fsync_folder, scratch
from CONFIG import UserError, log, need
from MODEL import load_for_use
from TOKENIZER import load_tokenizer


def logits_module(model):
    """The model as a plain (input_ids, attention_mask) -> logits module, without a KV cache."""
    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return Logits(model).eval()


def examples(vocab, seed=0):
    """Inputs of several shapes, each with a right-padded row, so the export is checked on padding too."""
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
    need("onnxscript", "the ONNX export")
    ort = need("onnxruntime", "the ONNX export")
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


def export(model, tokenizer, cfg, path, stem):
    """Write `path` and check it in its runtime: (the file's description, what was verified)."""
    e = cfg.export
    if e.format == "gguf":
        need("gguf", "--format gguf")
        import GGUF  # only for this format: it needs the optional gguf package
        GGUF.write(model, tokenizer, path, e.quant, os.path.basename(stem))
        return f"gguf {e.quant}", "; ".join(GGUF.verify(model, tokenizer, path, e.quant, e.min_agreement))
    module, inputs = logits_module(model), examples(model.config.vocab_size)
    diff, tolerance, how = {"onnx": export_onnx, "torchscript": export_torchscript}[e.format](module, inputs, path)
    if not diff <= tolerance:
        raise UserError(f"verification failed - {how} differs from PyTorch by {diff:.2e} (allowed {tolerance:.0e})")
    return e.format, (f"{how} on {len(inputs)} inputs of different lengths with padding: max |logit difference| "
                      f"{diff:.2e} <= {tolerance:.0e}")


def main(argv):
    cfg, flags, _ = CONFIG.load(argv, CONFIG.EXPORT_SECTIONS, description=__doc__, config_default=None)
    if "model.name" not in flags:
        raise UserError("--model is required: a directory written by TRAIN.py (e.g. --model out), or a .gguf")
    e = cfg.export
    for key in ("export.quant", "export.min_agreement"):
        if key in flags and e.format != "gguf":
            flag = "--" + key.removeprefix("export.").replace("_", "-")
            raise UserError(f"{flag} applies to --format gguf only - drop it, or add --format gguf")
    stem = cfg.model.name.rstrip("/").removesuffix(".gguf")
    path = e.out or stem + {"onnx": ".onnx", "torchscript": ".pt", "gguf": f"-{e.quant}.gguf"}[e.format]
    if os.path.abspath(path) == os.path.abspath(cfg.model.name):
        raise UserError(f"--out {path}: is the model being exported - write to another file")
    if os.path.exists(path) and not e.overwrite:
        raise UserError(f"--out {path}: already exists - pass --overwrite to replace it, or choose another --out")

    # tracing needs plain attention ops
    mcfg = dataclasses.replace(cfg.model, attn_implementation="eager") if e.format == "torchscript" else cfg.model
    model, tokenizer = load_for_use(mcfg, "export"), load_tokenizer(mcfg.name, mcfg.trust_remote_code)
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter: fold it into the base first
        model = model.merge_and_unload()
    # written and checked in a scratch folder beside --out (ATOMIC's temporary sibling), moved there only once
    # verified: a failed export leaves nothing that looks like a good file, and never replaces one
    parent = os.path.dirname(os.path.abspath(path))
    with scratch(parent, "export") as tmp:
        work = os.path.join(tmp, os.path.basename(path))
        try:
            kind, checks = export(model, tokenizer, cfg, work, stem)
        except UserError as err:
            raise UserError(f"{path}: {str(err).replace(work, path).removeprefix(path + ': ')} - nothing was written")
        fsync(tmp)
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        for f in os.listdir(tmp):  # the file, plus ONNX's external weights for a model over 2 GB
            os.replace(os.path.join(tmp, f), os.path.join(parent, f))
        fsync_folder(parent)
    log(f"wrote {path} ({size / 1e6:.1f} MB, {kind}); verified: {checks}")


if __name__ == "__main__":
    CONFIG.main_guard(main)
