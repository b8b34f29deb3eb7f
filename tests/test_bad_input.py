"""Every kind of bad input: one line on stderr naming the file/line or key and the fix, exit 2, no traceback."""
import importlib
import io
import shutil
import sys

import pytest

from REPORT import UserError
from conftest import ROOT, TINY, run

LONG_LINE = "word " * 400


def files(tmp):
    """The bad inputs, written fresh for each case."""
    (tmp / "dir.txt").mkdir()
    (tmp / "data.docx").write_text("a,b\n")
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text("\n   \n\n")
    (tmp / "badjson.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n')
    (tmp / "list.jsonl").write_text('["text", "x"]\n')
    (tmp / "notext.jsonl").write_text('{"body": "x"}\n')
    (tmp / "numtext.jsonl").write_text('{"text": 42}\n')
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp / "long.txt").write_text(("a short line\n" * 30) + LONG_LINE + "\n")
    (tmp / "unknown.yaml").write_text("training:\n  batch_sise: 4\n")
    (tmp / "broken.yaml").write_text("training:\n  batch_size: 4\n  epochs: [1, 2\n")
    (tmp / "notmodel").mkdir()
    (tmp / "emptyout").mkdir()
    (tmp / "fake.gguf").write_text("not a GGUF file\n")
    (tmp / "noanswer.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp / "mixed.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"text": "c"}\n')


CASES = [
    # (id, script, args, stdin, message)
    ("missing data file", "TRAIN.py", ["--data", "{t}/nope.txt"], None, "{t}/nope.txt: no such file or folder"),
    ("empty folder as data", "TRAIN.py", ["--data", "{t}/dir.txt"], None, "{t}/dir.txt: no data files in this folder"),
    ("unsupported extension", "TRAIN.py", ["--data", "{t}/data.docx"], None, "{t}/data.docx: unsupported file type"),
    ("empty file", "TRAIN.py", ["--data", "{t}/empty.txt"], None, "{t}/empty.txt: no samples"),
    ("only blank lines", "TRAIN.py", ["--data", "{t}/blank.txt"], None, "{t}/blank.txt: no samples"),
    ("invalid json", "TRAIN.py", ["--data", "{t}/badjson.jsonl"], None, "{t}/badjson.jsonl:3: invalid JSON"),
    ("json not an object", "TRAIN.py", ["--data", "{t}/list.jsonl"], None, "{t}/list.jsonl:1: expected a JSON object"),
    ("no field read", "TRAIN.py", ["--data", "{t}/notext.jsonl"], None,
     "{t}/notext.jsonl:1: none of the fields LLM-MINI reads (text, messages, prompt, completion, chosen, rejected, …); "
     "it has: body - map one, e.g. --columns text=body"),
    ("non-string text", "TRAIN.py", ["--data", "{t}/numtext.jsonl"], None, '{t}/numtext.jsonl:1: "text" is a int'),
    ("invalid utf-8", "TRAIN.py", ["--data", "{t}/latin1.txt"], None, "{t}/latin1.txt:1: invalid UTF-8"),
    ("unknown config key", "TRAIN.py", ["--config", "{t}/unknown.yaml"], None, "did you mean 'training.batch_size'"),
    ("unknown flag", "TRAIN.py", ["--lerning-rate", "1"], None, "did you mean '--learning-rate'"),
    ("wrong type", "TRAIN.py", ["--batch-size", "two"], None, "training.batch_size: expected an integer"),
    ("batch size 0", "TRAIN.py", ["--batch-size", "0"], None, "training.batch_size: must be >= 1"),
    ("negative lr", "TRAIN.py", ["--learning-rate", "-0.1"], None, "training.learning_rate: must be > 0"),
    ("grad_accum 0", "TRAIN.py", ["--grad-accum", "0"], None, "training.grad_accum: must be >= 1"),
    ("max_length above context", "TRAIN.py", ["--max-length", "200"], None,
     "training.max_length: 200 is above the model's context of 128"),
    ("yaml syntax", "TRAIN.py", ["--config", "{t}/broken.yaml"], None, "{t}/broken.yaml:4: YAML does not parse"),
    ("missing config", "TRAIN.py", ["--config", "{t}/none.yaml"], None, "{t}/none.yaml: config file not found"),
    ("model path missing", "TRAIN.py", ["--model", "{t}/no-model"], None, "{t}/no-model: no such model directory"),
    ("dir that is not a model", "TRAIN.py", ["--model", "{t}/notmodel"], None, "{t}/notmodel: is not a model directory"),
    ("resume without checkpoint", "TRAIN.py", ["--resume", "auto", "--out", "{t}/emptyout"], None,
     "{t}/emptyout: no complete checkpoint to resume"),
    ("resume a non-checkpoint", "TRAIN.py", ["--resume", "{t}/notmodel"], None, "{t}/notmodel: not a checkpoint"),
    ("bad override key", "TRAIN.py", ["--config-overrides", "{{n_layers: 2}}"], None,
     "'n_layers' is not a setting of gpt2 - did you mean 'n_layer'?"),
    ("scratch arch unknown", "TRAIN.py", ["--model", "gtp2", "--from-scratch"], None, "not an architecture"),
    ("conversation without answer", "TRAIN.py", ["--data", "{t}/noanswer.jsonl"], None,
     "{t}/noanswer.jsonl:1: the conversation has no assistant message"),
    ("two kinds in one file", "TRAIN.py", ["--data", "{t}/mixed.jsonl"], None,
     "{t}/mixed.jsonl:2: a text sample among prompt samples (the first at {t}/mixed.jsonl:1) - keep one kind per "
     "file or folder"),
    ("assistant loss on text", "TRAIN.py", ["--loss-on", "assistant"], None,
     "data.loss_on: assistant needs conversations or prompt/completion pairs, but tests/data/train.txt holds plain text"),
    ("float16 on cpu", "TRAIN.py", ["--dtype", "float16", "--device", "cpu"], None, "not supported for training on CPU"),
    ("empty prompt", "INFER.py", ["--model", "{m}", "--prompt", "  "], None, "empty prompt"),
    ("empty stdin", "INFER.py", ["--model", "{m}"], "", "empty prompt"),
    ("top-p above 1", "INFER.py", ["--model", "{m}", "--prompt", "a", "--top-p", "1.5"], None, "infer.top_p: must be <= 1"),
    ("top-p zero", "INFER.py", ["--model", "{m}", "--prompt", "a", "--top-p", "0"], None, "infer.top_p: must be > 0"),
    ("negative temperature", "INFER.py", ["--model", "{m}", "--prompt", "a", "--temperature", "-1"], None,
     "infer.temperature: must be >= 0"),
    ("infer without model", "INFER.py", ["--prompt", "a"], None, "--model is required"),
    ("infer model missing", "INFER.py", ["--model", "{t}/no-model", "--prompt", "a"], None, "no such model directory"),
    ("corrupt safetensors", "INFER.py", ["--model", "{t}/corrupt", "--prompt", "a"], None, "could not load the model"),
    ("gguf missing", "INFER.py", ["--model", "{t}/nope.gguf", "--prompt", "a"], None, "{t}/nope.gguf: no such GGUF file"),
    ("not a gguf", "EVAL.py", ["--model", "{t}/fake.gguf", "--data", "tests/data/train.txt"], None,
     "{t}/fake.gguf: could not load the model"),
    ("export an existing file", "EXPORT.py", ["--model", "{m}", "--format", "gguf", "--out", "{t}/fake.gguf"], None,
     "{t}/fake.gguf: already exists - pass --overwrite"),
    ("quant for onnx", "EXPORT.py", ["--model", "{m}", "--quant", "q8_0"], None,
     "--quant q8_0 does not apply to --format onnx - choose one of f32, int8"),
    ("quant for pt2", "EXPORT.py", ["--model", "{m}", "--format", "pt2", "--quant", "f16"], None,
     "--quant f16 does not apply to --format pt2 - drop it"),
    ("agreement for f32", "EXPORT.py", ["--model", "{m}", "--min-agreement", "0.9"], None,
     "--min-agreement applies to --format gguf --quant f16/q8_0 and --format onnx --quant int8"),
    ("overwrite a folder", "EXPORT.py", ["--model", "{m}", "--out", "{t}/emptyout", "--overwrite"], None,
     "--out {t}/emptyout: is a folder, not an earlier ONNX export, so --overwrite does not replace it"),
    ("export over the model", "EXPORT.py", ["--model", "{m}", "--format", "pt2", "--out", "{m}/..", "--overwrite"],
     None, "--out {m}/..: holds the model being exported or the current folder - write elsewhere"),
    ("onnx into a file", "EXPORT.py", ["--model", "{m}", "--out", "{t}/m.onnx"], None,
     "--out {t}/m.onnx: an ONNX export is a folder (model.onnx, the tokenizer, generate.py) - name a folder"),
]


def argv_of(script, args, tmp_path, trained):
    fill = dict(t=tmp_path, m=trained)
    files(tmp_path)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained / "ckpt-step-3", corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated mid-copy
    base = ["--config", TINY, "--out", tmp_path / "out"] if script == "TRAIN.py" else []
    return [str(a) for a in base] + [a.format(**fill) for a in args], fill


@pytest.mark.parametrize("script, args, stdin, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_user_error_naming_the_problem(tmp_path, trained, monkeypatch, script, args, stdin, message):
    """In-process, for speed: each case raises the one UserError that main_guard prints as one line."""
    argv, fill = argv_of(script, args, tmp_path, trained)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin if stdin is not None else "x"))
    main = importlib.import_module(script.removesuffix(".py")).main
    with pytest.raises(UserError) as e:
        main(argv)
    assert message.format(**fill) in str(e.value)


CONTRACT = ["missing data file", "unknown flag", "yaml syntax", "conversation without answer", "corrupt safetensors",
            "not a gguf", "export an existing file"]


@pytest.mark.parametrize("script, args, stdin, message", [c[1:] for c in CASES if c[0] in CONTRACT],
                         ids=[c[0] for c in CASES if c[0] in CONTRACT])
def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path, trained, script, args, stdin, message):
    """The contract, for a few cases of each script as a real process: exit 2, one error line, no traceback."""
    argv, fill = argv_of(script, args, tmp_path, trained)
    r = run(script, *argv, stdin=stdin if stdin is not None else "x")
    assert r.returncode == 2, r.stderr
    assert message.format(**fill) in r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
    assert r.stdout == ""


def test_overlong_line_is_truncated_with_one_warning(tmp_path):
    files(tmp_path)
    r = run("TRAIN.py", "--config", TINY, "--out", tmp_path / "out", "--data", tmp_path / "long.txt",
            "--max-steps", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning: 1 of 31 samples are longer than max_length=48") == 1


def test_prompt_longer_than_context_keeps_the_tail_with_one_warning(trained):
    r = run("INFER.py", "--model", trained, "--prompt", LONG_LINE, "--max-new-tokens", "10", "--greedy")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("keeping its last 118") == 1 and r.stdout.endswith("\n")


def test_debug_flag_shows_the_traceback(tmp_path):
    r = run("TRAIN.py", "--config", TINY, "--data", tmp_path / "nope.txt", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
