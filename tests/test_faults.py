"""Faults: interrupts, kills at any moment, non-finite steps, full disks and malicious checkpoint files."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, run, train, same_weights

LONG = ["--max-steps", "60", "--save-every", "4", "--log-every", "1"]


def start(out, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "TRAIN.py"), "--config", TINY, "--out", str(out),
                             *LONG, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=120):
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None and time.time() < end, "training ended before the point we wanted to kill it at"
        time.sleep(0.002)


def newest_step(out):
    steps = [int(n.rsplit("-", 1)[1]) for n in os.listdir(out) if n.startswith("ckpt-step-")] if out.exists() else []
    return max(steps, default=0)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    train(out, *LONG)
    return out


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_checkpoints_then_resume_matches_straight_run(tmp_path, straight, sig, code):
    out = tmp_path / "out"
    proc = start(out)
    wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "checkpoint written to" in err and "--resume auto" in err
    step = newest_step(out)
    assert 0 < step < 60 and (out / f"ckpt-step-{step}" / "training_state.pt").exists()
    train(out, *LONG, "--resume", "auto")
    assert same_weights(out, straight)


def test_second_interrupt_exits_at_once_leaving_complete_checkpoints(tmp_path):
    """The first Ctrl-C lets the step finish and checkpoint; a second one during that step exits at once."""
    out = tmp_path / "out"
    proc = start(out, "--batch-size", "64", "--grad-accum", "8")  # steps of about a second, to interrupt one
    wait_for(lambda: newest_step(out) >= 4, proc)
    proc.send_signal(signal.SIGINT)
    seen = ""
    while "stopping after this step" not in seen:  # the first signal was handled: the step goes on
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    before = newest_step(out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "checkpoint written to" not in seen + err and newest_step(out) == before  # no step finished, none saved
    for name in os.listdir(out):
        if name.startswith("ckpt-step-"):
            assert load_file(str(out / name / "model.safetensors"))


def test_sigkill_at_several_points_then_resume_is_bit_identical(tmp_path, straight):
    out = tmp_path / "out"
    kill_points = [
        lambda: any(n.startswith(".tmp-") and "ckpt" in n for n in os.listdir(out)) if out.exists() else False,  # mid-write
        lambda: newest_step(out) >= 12,   # between steps, shortly after a checkpoint
        lambda: (out / "metrics.jsonl").exists() and sum(1 for _ in open(out / "metrics.jsonl")) >= 30,  # mid-run
    ]
    for point in kill_points:
        proc = start(out, *(["--resume", "auto"] if newest_step(out) else []))
        try:
            wait_for(point, proc)
        finally:
            proc.kill()
            proc.communicate()
    train(out, *LONG, "--resume", "auto")
    assert same_weights(out, straight)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_non_finite_steps_stop_the_run_with_a_checkpoint(tmp_path):
    # lr 1e30: the first update blows the weights up, every later loss and gradient is inf/nan
    r = run("TRAIN.py", "--config", TINY, "--out", tmp_path / "out", "--learning-rate", "1e30", "--warmup-steps", "0",
            "--max-bad-steps", "2", "--max-steps", "20")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "non-finite gradients" in r.stderr and "ckpt-step-3" in r.stderr
    assert (tmp_path / "out" / "ckpt-step-3" / "training_state.pt").exists()


def test_disk_error_while_saving_keeps_the_previous_checkpoint(tmp_path, trained):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    shutil.rmtree(out / "ckpt-step-6")
    before = (out / "ckpt-step-3" / "model.safetensors").read_bytes()

    def small_files():  # like a full disk: any file over 64 KiB fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    r = subprocess.run([sys.executable, "TRAIN.py", "--config", TINY, "--out", str(out), "--resume", "auto"], cwd=ROOT,
                       capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "could not write the checkpoint" in r.stderr and "previous checkpoint is intact" in r.stderr
    assert (out / "ckpt-step-3" / "model.safetensors").read_bytes() == before
    assert not (out / "ckpt-step-6").exists() and not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_pickled_code_in_training_state_is_refused_and_never_runs(tmp_path, trained):
    ckpt = tmp_path / "ckpt-step-3"
    shutil.copytree(trained / "ckpt-step-3", ckpt)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"step": 3, "optimizer": Evil()}, ckpt / "training_state.pt")
    r = run("TRAIN.py", "--config", TINY, "--out", tmp_path / "out", "--resume", ckpt)
    assert r.returncode == 2 and "refused to load" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_training_state_of_another_model_is_refused(tmp_path, trained):
    ckpt = tmp_path / "ckpt-step-3"
    shutil.copytree(trained / "ckpt-step-3", ckpt)
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)
    torch.save(state, ckpt / "training_state.pt")
    r = run("TRAIN.py", "--config", TINY, "--out", tmp_path / "out", "--resume", ckpt)
    assert r.returncode == 2 and "does not match the model" in r.stderr and "Traceback" not in r.stderr
