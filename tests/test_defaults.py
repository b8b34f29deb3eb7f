"""Defaults by purpose: config.yaml is the demo's; a --model run gets fine-tuning defaults; bounded validation."""
import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import CONFIG
import FLAGS
from BATCHES import collate, count_targets, evenly_spaced, gather, held_out
from REPORT import UserError
from SETTINGS import load
from TRAIN import lr_at
from conftest import ROOT, reference_nll, run, train

# the README's full fine-tuning example, on the tests' text
FINE_TUNE = ["--data", "tests/data/train.txt", "tests/data/train.jsonl", "--out", "./out", "--epochs", "1",
             "--batch-size", "2", "--grad-accum", "16"]


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # where a user runs the scripts, and where config.yaml is


def test_config_yaml_is_the_default_experiment_when_no_model_is_named(at_root):
    cfg, _ = load([])
    demo = FLAGS.read_yaml("config.yaml")
    assert cfg.model.from_scratch and cfg.training.learning_rate == demo["training"]["learning_rate"]
    assert cfg.data.val_files == demo["data"]["val_files"] and cfg.training.max_length == demo["training"]["max_length"]


def test_a_fine_tune_command_gets_full_fine_tune_defaults_not_the_demos(at_root):
    cfg, _ = load(["--model", "some/model/dir", *FINE_TUNE])
    assert not cfg.model.from_scratch and cfg.model.config_overrides == {}
    assert cfg.training.learning_rate == 5e-5 and cfg.data.packing is False
    assert cfg.training.max_length is None  # the model's context (capped), set once the model is loaded
    assert cfg.data.val_fraction == 0.0 and cfg.training.warmup_steps == 0.05
    assert (cfg.training.batch_size, cfg.training.grad_accum, cfg.output.dir) == (2, 16, "./out")


def test_defaults_by_purpose_and_explicit_values_win(at_root):
    assert load(["--model", "m", "--lora"])[0].training.learning_rate == 2e-4
    scratch = load(["--model", "llama", "--from-scratch"])[0]
    assert scratch.training.learning_rate == 1e-3 and scratch.data.packing is True
    mine = load(["--model", "m", "--learning-rate", "3e-5", "--packing"])[0]
    assert mine.training.learning_rate == 3e-5 and mine.data.packing is True


def test_an_explicit_config_file_is_read_with_a_model_flag(tmp_path, at_root):
    path = tmp_path / "mine.yaml"
    path.write_text("training: {learning_rate: 1.0e-4, max_length: 64}\ndata: {packing: true}\n")
    cfg, _ = load(["--config", str(path), "--model", "m"])
    assert (cfg.training.learning_rate, cfg.training.max_length, cfg.data.packing) == (1e-4, 64, True)


def test_print_config_of_a_fine_tune_command_shows_the_fine_tune_defaults():
    r = run("TRAIN.py", "--model", "some/model/dir", *FINE_TUNE, "--print-config")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# config: built-in defaults | config.yaml not read, so its model.name, "
                               "model.from_scratch, model.config_overrides")
    assert "training.learning_rate, " in r.stdout.splitlines()[0] and "(--model names your own run" in r.stdout
    assert "learning_rate: 5.0e-05  # full fine-tune default" in r.stdout
    assert "packing: false  # full fine-tune default" in r.stdout
    assert "max_length: null  # the model's context, at most 1024" in r.stdout
    assert "from_scratch: false" in r.stdout and "val_fraction: 0.0" in r.stdout


def test_print_config_names_the_yaml_values_a_model_flag_drops(tmp_path):
    path = tmp_path / "scratch.yaml"
    path.write_text("model: {name: llama, from_scratch: true, dropout: 0.2}\ntraining: {learning_rate: 1.0e-4}\n")
    r = run("TRAIN.py", "--config", path, "--model", "some/model/dir", "--print-config")
    first = r.stdout.splitlines()[0]
    assert r.returncode == 0 and f"dropped from {path}: model.from_scratch, model.dropout (--model without " \
        "--from-scratch" in first
    assert "purpose: full fine-tune, so packing=false" in first and "learning_rate: 0.0001" in r.stdout
    assert "from_scratch: false" in r.stdout


def test_warmup_below_one_is_a_fraction_of_the_run():
    t = CONFIG.TrainingCfg(learning_rate=1.0, warmup_steps=0.1, min_lr_ratio=0.1)
    assert [lr_at(s, t, 20) for s in range(3)] == [0.5, 1.0, pytest.approx(1.0)]  # 2 of 20 steps, then the peak
    assert lr_at(0, t, 5) == 1.0  # a 5-step run warms up in one step and reaches its peak at once
    assert CONFIG.warmup_of(30.0, 1000) == 30 and CONFIG.warmup_of(0, 1000) == 0
    with pytest.raises(UserError, match=r"training.warmup_steps: 2.5 - give whole steps, or a fraction"):
        load(["--warmup-steps", "2.5"])


def timetable(n, seed):
    """Lines of a text unlike data/'s stories."""
    rnd = random.Random(seed)
    cities = ["Leeds", "York", "Bath", "Derby", "Ely", "Hull", "Wells", "Truro"]
    return "".join(f"The {rnd.randint(5, 23)}:{rnd.choice(['00', '15', '30', '45'])} train to {rnd.choice(cities)} "
                   f"leaves from platform {rnd.randint(1, 9)}.\n" for _ in range(n))


def perplexity(model, data):
    """Per-line perplexity (each line + EOS), computed in this process with transformers' own loss."""
    nll, n = reference_nll(model, [line for line in open(data).read().splitlines() if line.strip()])
    return math.exp(nll / n)


def test_a_fine_tune_without_a_learning_rate_does_not_wreck_the_model(tmp_path):
    """A model trained on tests/data/train.txt, fine-tuned on another text with the README's command and no learning-rate
    flag: its perplexity on held-out lines of the new text goes down, and on its first text rises by < 10%
    (config.yaml's demo rate, 3e-3, which this command inherited before, raises it by far more)."""
    base = tmp_path / "base"
    train(base, "--max-steps", "120", "--learning-rate", "3e-3", "--data", "tests/data/train.txt")
    (tmp_path / "new.txt").write_text(timetable(320, seed=0))
    (tmp_path / "new_held_out.txt").write_text(timetable(40, seed=1))
    before = perplexity(base, tmp_path / "new_held_out.txt"), perplexity(base, "tests/data/train.txt")
    r = run("TRAIN.py", "--model", base, "--data", tmp_path / "new.txt", "--out", tmp_path / "ft", "--epochs", "1",
            "--batch-size", "2", "--grad-accum", "16")
    assert r.returncode == 0, r.stderr
    assert "purpose: full fine-tune, so learning_rate=5.0e-05" in r.stderr
    after = perplexity(tmp_path / "ft", tmp_path / "new_held_out.txt"), perplexity(tmp_path / "ft", "tests/data/train.txt")
    assert after[0] < before[0], (before, after)
    assert after[1] < 1.1 * before[1], (before, after)


def test_held_out_documents_are_capped_in_tokens():
    ends = torch.arange(1, 1001) * 10  # 1,000 documents of 10 tokens
    assert held_out(ends.numpy(), 0.1, 10**6) == 100
    assert held_out(ends.numpy(), 0.1, 250) == 25   # the last 25 documents fit in 250 tokens
    assert held_out(ends.numpy(), 0.1, 5) == 1      # at least one
    assert held_out(ends.numpy(), 0.0, 250) == 0


def test_evenly_spaced_subset_is_fixed_and_spread():
    assert evenly_spaced(50, 0) == evenly_spaced(50, 60) == list(range(50))
    assert evenly_spaced(50, 5) == [0, 10, 20, 30, 40]


def test_large_validation_set_is_scored_on_a_fixed_capped_subset(tmp_path):
    """Half of data/ held out (208 sequences), but each validation scores the same 2 batches x 4: the logged loss
    equals the loss of exactly those 8 sequences, computed independently from the saved model."""
    out = tmp_path / "out"
    r = train(out, "--val-fraction", "0.5", "--eval-every", "2", "--eval-batches", "2", "--batch-size", "4")
    assert "validation scores the same 8 of its 208 sequences each time" in r.stderr
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "val_loss" in line]
    assert [row["step"] for row in rows] == [2, 4, 6] and all(row["val_sequences"] == 8 for row in rows)
    assert all(0 < row["val_share"] < 1 for row in rows) and "of the wall time so far" in r.stderr

    from BATCHES import load as load_data
    from DATA import sources
    cfg, _ = load(["--config", "tests/tiny.yaml", "--val-fraction", "0.5"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    _, val = load_data(cfg.data, sources(cfg.data), tokenizer, cfg.training.max_length)
    batch = collate(gather(val, range(len(val)))[::26][:8], tokenizer.pad_token_id)
    with torch.no_grad():
        nll = model(**batch, num_items_in_batch=torch.tensor(1)).loss.item()
    assert rows[-1]["val_loss"] == pytest.approx(nll / count_targets(batch), rel=1e-5)
    assert math.isclose(rows[-1]["val_ppl"], math.exp(rows[-1]["val_loss"]))


def test_resume_with_other_settings_says_which(tmp_path, trained):
    r = train(tmp_path / "out", "--resume", trained / "ckpt-step-3", "--learning-rate", "2e-3")
    assert "note: resuming with settings that differ from the checkpoint's: training.learning_rate: 0.001 -> 0.002" \
        in r.stderr
