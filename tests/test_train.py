"""TRAIN.py: exact gradient accumulation, bit-identical resume, loadable checkpoints, safe output dirs."""
import json
import os
import re
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from BATCHES import collate, count_targets, plain
from BATCHES import micro_batches
from CONFIG import TrainingCfg
from DISTRIBUTED import Run
from TRAIN import due, lr_at, param_groups
from conftest import run, same_weights, train, weights

STRAIGHT = ["--seed", "7"]


def tiny_model():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(cfg)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_accumulated_gradients_equal_big_batch_gradients_with_unequal_lengths():
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(1, 50, (n,), generator=g).tolist() + [0] for n in (3, 17, 5, 30, 9, 2, 22, 11)]
    model = tiny_model()
    big = collate([plain(s) for s in samples], pad_id=0)
    model(**big, num_items_in_batch=torch.tensor(count_targets(big))).loss.backward()
    expected = grads(model)

    model.zero_grad()
    micro = [collate([plain(s) for s in samples[i:i + 2]], pad_id=0) for i in range(0, 8, 2)]
    n = torch.tensor(sum(count_targets(b) for b in micro))  # what TRAIN.py does: targets of the whole step
    for b in micro:
        model(**b, num_items_in_batch=n).loss.backward()
    for a, b in zip(grads(model), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    model.zero_grad()  # the 2024 Trainer bug (mean of per-micro-batch means) really differs here
    for b in micro:
        (model(**b).loss / len(micro)).backward()
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads(model), expected))


def test_train_py_accumulation_matches_big_batch(tmp_path):
    """batch 8 x accum 1 and batch 2 x accum 4 give the same first AdamW moment, i.e. the same gradient."""
    common = ["--max-steps", "1", "--grad-clip", "0", "--save-every", "1", "--config-overrides",
              "{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 128, resid_pdrop: 0, embd_pdrop: 0, attn_pdrop: 0}"]
    train(tmp_path / "big", *common, "--batch-size", "8", "--grad-accum", "1", "--from-scratch", "--model", "gpt2")
    train(tmp_path / "acc", *common, "--batch-size", "2", "--grad-accum", "4", "--from-scratch", "--model", "gpt2")
    big = torch.load(tmp_path / "big/ckpt-step-1/training_state.pt", weights_only=True)["optimizer"]["state"]
    acc = torch.load(tmp_path / "acc/ckpt-step-1/training_state.pt", weights_only=True)["optimizer"]["state"]
    assert big.keys() == acc.keys()
    for k in big:
        torch.testing.assert_close(acc[k]["exp_avg"], big[k]["exp_avg"], rtol=1e-5, atol=1e-8)


def test_resume_continues_bit_identically(tmp_path, trained):
    """Resuming from step 3 reproduces the straight 6-step run exactly: weights, data order, dropout RNG."""
    r = train(tmp_path / "resumed", "--resume", trained / "ckpt-step-3")
    assert "resumed from" in r.stderr
    a, b = weights(trained), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_picks_newest_complete_checkpoint(tmp_path):
    out = tmp_path / "out"
    train(out, "--max-steps", "3")
    (out / ".tmp-4999999-ckpt-step-9").mkdir()  # what a kill during a checkpoint write leaves (pid long gone)
    (out / "ckpt-step-8").mkdir()           # no training_state.pt: not a complete checkpoint
    r = train(out, "--resume", "auto")      # tiny.yaml asks for 6 steps
    assert "resumed from" in r.stderr and "ckpt-step-3" in r.stderr
    assert not (out / ".tmp-4999999-ckpt-step-9").exists()
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [2, 3, 4, 6]


def test_checkpoints_load_in_plain_transformers(trained):
    for path in (trained, trained / "ckpt-step-3", trained / "ckpt-step-6"):
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert (trained / "train_config.yaml").exists() and (trained / "ckpt-step-3" / "train_config.yaml").exists()
    assert not list(trained.glob("**/*.bin")) and not list(trained.glob("**/*.pkl"))


def test_keeps_only_the_last_checkpoints(tmp_path):
    out = tmp_path / "out"
    train(out, "--save-every", "1", "--keep-last", "2")
    assert sorted(p.name for p in out.glob("ckpt-step-*")) == ["ckpt-step-5", "ckpt-step-6"]


def test_metrics_and_loss_goes_down(trained):
    rows = [json.loads(line) for line in open(trained / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_refuses_to_start_over_a_previous_run(trained, tmp_path):
    before = weights(trained)
    r = run("TRAIN.py", "--config", "tests/tiny.yaml", "--out", trained)
    assert r.returncode == 2 and "already holds a training run" in r.stderr and "--resume auto" in r.stderr
    assert all(torch.equal(before[k], v) for k, v in weights(trained).items())


def test_overwrite_leaves_only_the_new_run_and_the_users_own_files(trained, tmp_path):
    """A folder that held a whole run (checkpoints, the best one, a merged model, the curve) keeps none of it after
    --overwrite; a file of the user's stays, and the log names it."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    for old in ("ckpt-best", "merged"):
        shutil.copytree(trained / "ckpt-step-3", out / old)
    (out / "loss.png").write_bytes(b"an old curve")
    (out / "notes.txt").write_text("my notes")
    r = train(out, "--overwrite", "--max-steps", "2", "--save-every", "1", "--keep-last", "1")
    assert "kept notes.txt" in r.stderr
    assert (out / "notes.txt").read_text() == "my notes"
    assert not {"ckpt-best", "merged", "ckpt-step-3", "ckpt-step-6"} & set(os.listdir(out))
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [2]  # only the new run's rows
    assert (out / "loss.png").read_bytes() != b"an old curve" and (out / "ckpt-step-2").is_dir()
    assert not same_weights(out, trained)


def test_hub_id_offline_fails_fast_in_one_line():
    start = time.time()
    r = run("TRAIN.py", "--model", "gpt2", "--max-steps", "1", "--out", "/tmp/never-written",
            env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": "/tmp/llm-mini-empty-hub-cache"})
    assert time.time() - start < 20
    assert r.returncode == 2, r.stderr
    assert "Hugging Face Hub is unreachable" in r.stderr and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if not line.startswith("config: ")] == [r.stderr.splitlines()[-1]]
    assert r.stderr.splitlines()[-1].startswith("error: gpt2: not a local directory")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    t = TrainingCfg(learning_rate=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, t, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lr_at(20, t, 20) == pytest.approx(0.1)


def test_weight_decay_goes_to_matrices_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_the_readme_fine_tune_command_fine_tunes_a_local_model_directory(tmp_path, trained):
    """The README's fine-tuning command, with a local model directory in place of gpt2 and config.yaml present."""
    out = tmp_path / "out"
    r = run("TRAIN.py", "--model", trained, "--data", "tests/data/train.txt", "tests/data/train.jsonl", "--out", out,
            "--epochs", "1", "--batch-size", "2", "--grad-accum", "16")
    assert r.returncode == 0, r.stderr
    assert "global batch 32 = 2 x 16 accum" in r.stderr
    ckpts = sorted(out.glob("ckpt-step-*"))
    assert ckpts
    for path in (out, *ckpts):
        assert AutoModelForCausalLM.from_pretrained(path).config.n_embd == 32  # the local model, not scratch
        g = run("INFER.py", "--model", path, "--prompt", "Once upon a time", "--max-new-tokens", "5")
        assert g.returncode == 0 and g.stdout.endswith("\n"), g.stderr  # a barely trained model may say little


def test_compile_trains_the_same_and_saves_plain_checkpoints(tmp_path):
    """torch.compile: same weights as eager (to float rounding; no dropout, whose compiled RNG differs),
    checkpoints without the _orig_mod. prefix, loadable without compile."""
    no_dropout = ["--config-overrides", "{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 128, resid_pdrop: 0, "
                  "embd_pdrop: 0, attn_pdrop: 0}", "--max-steps", "3"]
    train(tmp_path / "eager", *no_dropout)
    r = train(tmp_path / "compiled", *no_dropout, "--compile")
    compiled_graphs = re.search(r"torch.compile: (\d+) graphs compiled", r.stderr)
    assert compiled_graphs and int(compiled_graphs[1]) >= 1, r.stderr  # compiled, not the eager fallback
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert compiled.keys() == eager.keys() and not [k for k in compiled if "_orig_mod" in k], r.stderr
    for k, v in compiled.items():
        torch.testing.assert_close(v, eager[k], rtol=1e-4, atol=1e-5)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "compiled")


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, trained):
    r = train(tmp_path / "ckpt", "--recompute", "all")
    assert "| recompute on" in r.stderr  # the model's own flag, read back after enabling it
    for k, v in weights(tmp_path / "ckpt").items():
        torch.testing.assert_close(v, weights(trained)[k], rtol=1e-5, atol=1e-6)


def test_micro_batches_give_each_rank_its_share_of_each_micro_step():
    """A global batch of 8 = 2 micro-steps x 2 ranks x 2 sequences: micro-step m, rank r takes the slice
    [(m * world + r) * batch_size, ... + batch_size) of the shared index list."""
    from BATCHES import sequences
    from DATA import Corpus
    import numpy as np
    corpus = Corpus(np.arange(80), np.ones(80, dtype=np.uint8), np.arange(10, 90, 10), np.zeros(8, dtype=bool))
    data = sequences(corpus, 0, 8, 16, packing=False)
    idx = [7, 6, 5, 4, 3, 2, 1, 0]
    first = lambda batch: [int(row[0]) for row in batch["input_ids"]]  # token i*10 starts document i
    for rank, expected in ((0, [[70, 60], [30, 20]]), (1, [[50, 40], [10, 0]])):
        got = micro_batches(data, idx, TrainingCfg(batch_size=2, grad_accum=2), Run(rank=rank, world=2), 0)
        assert [first(b) for _, b in got] == expected
    got = micro_batches(data, idx, TrainingCfg(batch_size=4, grad_accum=2), Run(), 0)
    assert [first(b) for _, b in got] == [[70, 60, 50, 40], [30, 20, 10, 0]]


@pytest.mark.parametrize("step, every, last, expected", [(10, 10, False, True), (11, 10, False, False),
                                                         (11, 10, True, True), (10, 0, False, False), (3, 0, True, True)])
def test_due(step, every, last, expected):
    assert due(step, every, last) is expected


@pytest.mark.parametrize("device, purpose, bf16, expected", [
    ("cuda", "train", True, torch.bfloat16), ("cuda", "train", False, torch.float16),   # fp16 with the scaler
    ("cuda", "generate", True, torch.bfloat16), ("cuda", "generate", False, torch.float32),
    ("cuda", "score", True, torch.float32), ("cuda", "export", True, torch.float32),    # exact numbers
    ("cpu", "train", True, torch.bfloat16), ("cpu", "train", False, torch.float32),
    ("cpu", "generate", True, torch.float32), ("cpu", "score", True, torch.float32),
    ("mps", "train", False, torch.float32),
])
def test_dtype_auto_means_one_thing_per_purpose_and_device(device, purpose, bf16, expected):
    from DEVICE import auto_dtype
    assert auto_dtype(device, purpose, bf16) is expected


@pytest.mark.parametrize("name, purpose, expected", [("float32", "train", torch.float32),
                                                     ("bfloat16", "generate", torch.bfloat16),
                                                     ("float16", "generate", torch.float16)])
def test_a_named_dtype_is_that_dtype(name, purpose, expected):
    from DEVICE import pick_dtype
    assert pick_dtype(name, torch.device("cpu"), purpose) is expected


def test_float16_training_on_cpu_is_refused_and_bf16_without_hardware_warned(capsys):
    from REPORT import UserError
    from DEVICE import cpu_has_native_bf16, pick_dtype
    with pytest.raises(UserError, match="float16 is not supported for training on CPU"):
        pick_dtype("float16", torch.device("cpu"), "train")
    pick_dtype("bfloat16", torch.device("cpu"), "train")
    assert ("30x slower" in capsys.readouterr().err) is not cpu_has_native_bf16()


def test_flash_attention_is_allowed_on_any_cuda_device_and_refused_elsewhere(monkeypatch):
    import importlib.util
    from REPORT import UserError
    from DEVICE import check_attention
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    for device in ("cuda", "cuda:0", "cuda:1"):  # torchrun gives rank 1 the device cuda:1
        check_attention("flash_attention_2", torch.device(device))
    with pytest.raises(UserError, match="flash_attention_2 needs a CUDA GPU"):
        check_attention("flash_attention_2", torch.device("cpu"))
