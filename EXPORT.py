"""Export a trained model for another runtime, and prove the file works there before saying so.

    python EXPORT.py --model out --format onnx --out model-onnx          # a folder: generates in onnxruntime
    python model-onnx/generate.py --prompt "It is a truth"               # ... with onnxruntime alone, no torch
    python EXPORT.py --model out --format gguf --quant q8_0 --out m.gguf # checked in llama.cpp + transformers
    python EXPORT.py --model out --format pt2 --out model.pt2            # checked with torch.export.load
    python EXPORT.py --model out --format torchscript --out model.pt     # checked with torch.jit.load

ONNX is a folder (ONNX.py): model.onnx with a KV cache, the tokenizer, and generate.py (ONNX_RUN.py), checked
by generating greedily in onnxruntime: the tokens must be INFER.py --greedy's. GGUF holds the weights and the
tokenizer in llama.cpp's layout (gpt2 and llama architectures), checked by reading it back with transformers and,
when llama-cpp-python is installed, by generating with llama.cpp. pt2 (torch.export) and TorchScript (deprecated
in PyTorch, kept for old consumers) map (input_ids, attention_mask), both (batch, seq) int64, to logits
(batch, seq, vocab) with dynamic sizes, checked on inputs of several lengths with padding in a fresh process.
A LoRA adapter directory is merged into its base first. A failed check is an error, never a silent success.
"""
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import torch

import CONFIG
import FLAGS
import REPORT
import SETTINGS
from ATOMIC import replacing
from MODEL import load_for_use
from REPORT import UserError, log, need
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


def check_in_fresh_process(module, inputs, path, load, how):
    """Load `path` in a fresh process with torch alone (no transformers), as a user of the file would, with the
    Python expression `load` (of p, the path) -> the largest logit difference on `inputs`, and how it was checked."""
    with tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():
            torch.save([(i, m, module(i, m)) for i, m in inputs], os.path.join(tmp, "cases.pt"))
        code = ("import sys, torch\n"
                f"p = sys.argv[1]\nm = {load}\n"
                "cases = torch.load(sys.argv[2], weights_only=True)\n"
                "print(max(float(((m(i, a) - ref).abs().amax(-1) * a).max()) for i, a, ref in cases))")
        r = subprocess.run([sys.executable, "-c", code, path, os.path.join(tmp, "cases.pt")], capture_output=True,
                           text=True)
    if r.returncode:
        raise UserError(f"{how} failed ({r.stderr.strip().splitlines()[-1]})")
    return float(r.stdout), 1e-5, how


def export_torchscript(module, inputs, path):
    log("note: TorchScript (torch.jit) is deprecated in PyTorch and transformers 5 no longer supports it; "
        "--format pt2 (torch.export) is its successor, --format onnx the way to generate outside Python")
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs[0], check_trace=False)
    traced.save(path)
    return check_in_fresh_process(module, inputs, path, "torch.jit.load(p)", "torch.jit.load in a fresh process")


def export_pt2(module, inputs, path):
    any_size = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        program = torch.export.export(module, inputs[0], dynamic_shapes={"input_ids": {0: any_size, 1: any_size},
                                                                         "attention_mask": {0: any_size, 1: any_size}})
    torch.export.save(program, path)
    return check_in_fresh_process(module, inputs, path, "torch.export.load(p).module()",
                                  "torch.export.load in a fresh process")


def export(model, tokenizer, cfg, path, stem):
    """Write `path` and check it in its runtime: (the file's description, what was verified)."""
    e = cfg.export
    if e.format == "gguf":
        need("gguf", "--format gguf")
        import GGUF  # only for this format: it needs the optional gguf package
        GGUF.write(model, tokenizer, path, e.quant, os.path.basename(stem))
        return f"gguf {e.quant}", "; ".join(GGUF.verify(model, tokenizer, path, e.quant, e.min_agreement))
    if e.format == "onnx":
        need("onnxscript", "--format onnx")  # torch.onnx.export's dynamo exporter writes with it
        need("onnxruntime", "--format onnx")
        import ONNX  # only for this format: it needs onnxruntime
        os.makedirs(path)
        ONNX.write(model, tokenizer, path, e.quant)
        return f"onnx {e.quant} with a KV cache", "; ".join(ONNX.verify(model, tokenizer, path, e.quant,
                                                                           e.min_agreement))
    module, inputs = logits_module(model), examples(model.config.vocab_size)
    diff, tolerance, how = {"pt2": export_pt2, "torchscript": export_torchscript}[e.format](module, inputs, path)
    if not diff <= tolerance:
        raise UserError(f"verification failed - {how} differs from PyTorch by {diff:.2e} (allowed {tolerance:.0e})")
    return e.format, (f"{how} on {len(inputs)} inputs of different lengths with padding: max |logit difference| "
                      f"{diff:.2e} <= {tolerance:.0e}")


# what an ONNX export folder holds (ONNX.write): an earlier one holding anything else is not replaced
ONNX_FILE = re.compile(r"model\.onnx(\.data)?|generation\.json|genai_config\.json|generate\.py|chat_template\.jinja"
                       r"|tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt")


def out_path(cfg, stem):
    """Where the export goes (--out, or beside the model), refused where writing there could lose a user's files."""
    e = cfg.export
    path = (e.out or stem + {"onnx": "-onnx" if e.quant == "f32" else f"-onnx-{e.quant}", "pt2": ".pt2",
                             "torchscript": ".pt", "gguf": f"-{e.quant}.gguf"}[e.format]).rstrip("/")
    if e.format == "onnx" and path.endswith(".onnx"):
        raise UserError(f"--out {path}: an ONNX export is a folder (model.onnx, the tokenizer, generate.py) - "
                        f"name a folder, e.g. --out {path.removesuffix('.onnx')}-onnx")
    target, model = os.path.abspath(path), os.path.abspath(cfg.model.name)
    if any(inside == target or inside.startswith(target.rstrip(os.sep) + os.sep) for inside in (model, os.getcwd())):
        raise UserError(f"--out {path}: holds the model being exported or the current folder - write elsewhere")
    if os.path.exists(path) and not e.overwrite:
        raise UserError(f"--out {path}: already exists - pass --overwrite to replace it, or choose another --out")
    if os.path.isdir(path) and not (e.format == "onnx" and os.path.exists(os.path.join(path, "generate.py"))
                                    and os.path.exists(os.path.join(path, "model.onnx"))):
        raise UserError(f"--out {path}: is a folder, not an earlier ONNX export, so --overwrite does not replace it "
                        "- choose another --out")
    extra = sorted(f for f in os.listdir(path) if not ONNX_FILE.fullmatch(f)) if os.path.isdir(path) else []
    if extra:  # an earlier export is replaced whole: it may hold nothing but what an export writes
        raise UserError(f"--out {path}: holds files an export does not write ({', '.join(extra[:5])}) - move them, "
                        "or choose another --out")
    if os.path.isfile(path) and e.format == "onnx":
        raise UserError(f"--out {path}: is a file, and an ONNX export is a folder - choose another --out")
    return path


def with_defaults(cfg):
    """cfg with export.quant and export.min_agreement filled (checked against --format already: CONFIG.rules)."""
    e = cfg.export
    return FLAGS.replaced(cfg, {"export.quant": CONFIG.quant_of(e),
                                "export.min_agreement": 0.99 if e.min_agreement is None else e.min_agreement})


USAGE = "python EXPORT.py --model out (a directory written by TRAIN.py, or a .gguf)"


def main(argv):
    cfg, resolved = SETTINGS.load(argv, CONFIG.EXPORT_SECTIONS, __doc__, None, ("model.name",), USAGE)
    if resolved.print_only:
        return FLAGS.print_config(cfg, resolved)
    cfg = with_defaults(cfg)
    e = cfg.export
    stem = cfg.model.name.rstrip("/").removesuffix(".gguf")
    path = out_path(cfg, stem)

    # tracing needs plain attention ops; onnxruntime checks the ONNX graph on the CPU, against the model in fp32
    mcfg = dataclasses.replace(cfg.model, attn_implementation="eager") if e.format == "torchscript" else \
        dataclasses.replace(cfg.model, device="cpu", dtype="float32") if e.format == "onnx" else cfg.model
    model, tokenizer = load_for_use(mcfg, "export"), load_tokenizer(mcfg.name, mcfg.trust_remote_code)
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter: fold it into the base first
        model = model.merge_and_unload()
    # written and checked as a temporary sibling of --out, renamed into place only once verified (a folder replaces
    # its predecessor whole): a failed export leaves nothing that looks like a good file, and never replaces one
    try:
        with replacing(os.path.abspath(path)) as tmp:
            kind, checks = export(model, tokenizer, cfg, tmp, stem)
    except UserError as err:
        raise UserError(f"{path}: {err} - nothing was written")
    files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    size = sum(map(os.path.getsize, files))
    log(f"wrote {path} ({size / 1e6:.1f} MB, {kind}); verified: {checks}")


if __name__ == "__main__":
    REPORT.main_guard(main)
