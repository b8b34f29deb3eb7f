"""torchrun: DDP on CPU (gloo) updates the weights as one process with the same global batch."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, train, same_weights

NO_DROPOUT = ["--config-overrides", "{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 128, "
              "resid_pdrop: 0, embd_pdrop: 0, attn_pdrop: 0}", "--max-steps", "4", "--save-every", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "TRAIN.py", "--config", TINY]


def torchrun(out, *args, timeout=120):
    r = subprocess.run(TORCHRUN + ["--out", str(out), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    train(out, *NO_DROPOUT, "--batch-size", "8", "--grad-accum", "1")
    return out


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, single):
    r = torchrun(tmp_path / "ddp", *NO_DROPOUT, "--batch-size", "2", "--grad-accum", "2")
    assert "global batch 8 = 2 x 2 accum x 2 ranks" in r.stderr
    assert r.stderr.count("global batch") == 1  # only rank 0 speaks
    assert same_weights(tmp_path / "ddp", single, rtol=1e-5, atol=1e-6)


def test_two_rank_checkpoint_resumes_in_one_process(tmp_path, single):
    torchrun(tmp_path / "ddp", *NO_DROPOUT, "--batch-size", "4", "--grad-accum", "1")
    train(tmp_path / "one", *NO_DROPOUT, "--batch-size", "8", "--grad-accum", "1", "--resume", tmp_path / "ddp" / "ckpt-step-2")
    assert same_weights(tmp_path / "one", tmp_path / "ddp", rtol=1e-5, atol=1e-6)
    assert same_weights(tmp_path / "one", single, rtol=1e-5, atol=1e-6)


def test_killing_one_rank_ends_the_job_with_an_error(tmp_path):
    proc = subprocess.Popen(TORCHRUN + ["--out", str(tmp_path / "out"), "--max-steps", "100000", "--save-every", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "out" / "metrics.jsonl").exists():  # both ranks are training
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [p for p in workers if b"RANK=1\0" in open(f"/proc/{p}/environ", "rb").read()]
        os.kill(int(rank1[0]), signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.time() - killed < 60
    assert "rank      : 1" in err and "SIGKILL" in err


def test_fsdp_equals_one_process_and_writes_plain_checkpoints(tmp_path, single):
    """FSDP2 (fully_shard) runs on CPU/gloo in torch 2.13: same weights, same checkpoint format."""
    torchrun(tmp_path / "fsdp", *NO_DROPOUT, "--batch-size", "4", "--grad-accum", "1", "--fsdp")
    assert same_weights(tmp_path / "fsdp", single, rtol=1e-5, atol=1e-6)
    assert same_weights(tmp_path / "fsdp" / "ckpt-step-2", single / "ckpt-step-2", rtol=1e-5, atol=1e-6)
    train(tmp_path / "one", *NO_DROPOUT, "--batch-size", "8", "--grad-accum", "1", "--resume",
          tmp_path / "fsdp" / "ckpt-step-2")
    assert same_weights(tmp_path / "one", single, rtol=1e-5, atol=1e-6)
    torchrun(tmp_path / "back", *NO_DROPOUT, "--batch-size", "4", "--grad-accum", "1", "--fsdp", "--resume",
             single / "ckpt-step-2")
    assert same_weights(tmp_path / "back", single, rtol=1e-5, atol=1e-6)


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "TRAIN.py", "--config", TINY, "--out", str(tmp_path), "--fsdp"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "launch with torchrun" in r.stderr and "Traceback" not in r.stderr
