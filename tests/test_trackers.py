"""--report-to: each tracker stores what metrics.jsonl holds, read back through the tracker's own reader (W&B's
offline run files, TensorBoard's event files, trackio's SQLite store, MLflow's client); a resumed run continues
the same tracker run without sending a step twice; a tracker that is missing or cannot start does not stop
training."""
import collections
import glob
import json
import os
import re
import struct
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run, train

RUN = ["--max-steps", "6", "--log-every", "2", "--save-every", "2", "--val-fraction", "0.1", "--eval-every", "3"]
SAME_AGAIN = ("loss", "lr", "grad_norm", "skipped_steps", "val_loss", "val_ppl", "val_sequences")  # not timings


def metrics(out):
    """[(step, name, value)] of OUT/metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["step"], k, v) for r in rows for k, v in r.items() if k != "step"]


def tensorboard_entries(out):
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    return [(e.step, v.tag, v.simple_value) for f in sorted(glob.glob(f"{out}/tensorboard/*/events.out.tfevents.*"))
            for e in LegacyEventFileLoader(f).Load() for v in e.summary.value if v.HasField("simple_value")]


def wandb_records(path):
    """The protobuf Records of a W&B run file: a 7-byte header, then LevelDB's log format (32 KiB blocks; records
    framed by checksum, length and type: full, or first/middle/last pieces)."""
    from wandb.proto import wandb_internal_pb2
    data, out, pending, pos = open(path, "rb").read(), [], b"", 7
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # the padding at the end of a block
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(pending))
    return out


def wandb_entries(out):
    records = [r for f in sorted(glob.glob(f"{out}/wandb/offline-run-*/run-*.wandb")) for r in wandb_records(f)]
    history = [({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}, r.history.step.num)
               for r in records
               if r.WhichOneof("record_type") == "history"]
    return [(h.get("_step", step), k, v) for h, step in history for k, v in h.items() if not k.startswith("_")]


def trackio_entries(out):
    """Through trackio's API, in a process of its own: trackio reads TRACKIO_DIR once, when it is imported."""
    name = json.load(open(os.path.join(out, "trackers.json")))["run_name"]
    code = f"import json, trackio; print(json.dumps(trackio.SQLiteStorage.get_logs('llm-mini', {name!r})))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "TRACKIO_DIR": str(out.parent / "trackio")})
    logs = json.loads(r.stdout.strip().splitlines()[-1])
    return [(row["step"], k, v) for row in logs for k, v in row.items() if k not in ("step", "timestamp")]


def mlflow_entries(out):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run_id = json.load(open(os.path.join(out, "trackers.json")))["mlflow"]["id"]
    return [(m.step, key, m.value) for key in client.get_run(run_id).data.metrics
            for m in client.get_metric_history(run_id, key)]


def tensorboard_samples(out):
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    texts = [(e.step, v.tensor.string_val[0].decode()) for f in sorted(glob.glob(f"{out}/tensorboard/*/events.*"))
             for e in LegacyEventFileLoader(f).Load() for v in e.summary.value if v.tag == "samples/text_summary"]
    parts = [(step, re.findall(r"\*\*(\w+)\*\*\n\n```\n(.*?)\n```", text, re.S)) for step, text in texts]
    return [(step, [dict(p[i:i + 3]) for i in range(0, len(p), 3)]) for step, p in parts]


def wandb_samples(out):
    files = glob.glob(f"{out}/wandb/offline-run-*/files/media/table/samples_*.table.json")
    tables = sorted((int(f.split("samples_")[1].split("_")[0]), json.load(open(f))) for f in files)
    return [(step, [dict(zip(t["columns"], row)) for row in t["data"]]) for step, t in tables]


def trackio_samples(out):
    return [(step, value["_value"]) for step, name, value in trackio_entries(out) if name == "samples"]


def mlflow_samples(out):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run_id = json.load(open(os.path.join(out, "trackers.json")))["mlflow"]["id"]
    t = json.load(open(client.download_artifacts(run_id, "samples.json", str(out.parent))))  # MLflow's table format
    table = [dict(zip(t["columns"], row)) for row in t["data"]]
    steps = sorted({row["step"] for row in table})
    return [(step, [{k: row[k] for k in ("prompt", "model", "data")} for row in table if row["step"] == step])
            for step in steps]


def greedy(out, prompts, n=32):
    """What the saved model continues each prompt with, greedy, through transformers' own generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    answers = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        answers.append(tok.decode(new, skip_special_tokens=True))
    return answers


SAMPLES = {"tensorboard": tensorboard_samples, "wandb": wandb_samples, "trackio": trackio_samples,
           "mlflow": mlflow_samples}
READ = {"tensorboard": tensorboard_entries, "wandb": wandb_entries, "trackio": trackio_entries,
        "mlflow": mlflow_entries}


def assert_same(got, want, names=None):
    keep = (lambda name: name in names) if names else (lambda name: name.split("/")[0] not in ("loss_curve", "samples"))
    got = [(s, k, v) for s, k, v in got if keep(k)]
    twice = [key for key, n in collections.Counter((s, k) for s, k, _ in got).items() if n > 1]
    assert not twice, f"sent twice: {twice[:5]}"
    want = {(s, k): v for s, k, v in want if keep(k)}
    assert {(s, k) for s, k, _ in got} == set(want)
    for s, k, v in got:  # TensorBoard keeps float32
        assert v == pytest.approx(want[s, k], rel=1e-6), (s, k)


@pytest.mark.parametrize("tracker", list(READ))
def test_a_tracker_holds_what_metrics_jsonl_holds_and_a_resume_continues_it(tracker, tmp_path):
    pytest.importorskip("torch.utils.tensorboard" if tracker == "tensorboard" else tracker,
                        reason=f"{tracker} is not installed")
    out, env = tmp_path / "out", {"WANDB_MODE": "offline", "TRACKIO_DIR": str(tmp_path / "trackio")}
    train(out, *RUN, "--report-to", tracker, env=env)
    assert_same(READ[tracker](out), metrics(out))
    # at each validation, a few validation texts' beginnings and the model's greedy continuations: at the last one,
    # those the saved model gives
    val_steps = [step for step, name, _ in metrics(out) if name == "val_loss"]
    samples = SAMPLES[tracker](out)
    assert [step for step, _ in samples] == val_steps and all(len(rows) == 3 for _, rows in samples)
    held_out = open(os.path.join(ROOT, "tests/data/train.txt")).read() + open(os.path.join(ROOT, "tests/data/train.jsonl")).read()
    assert all(r["prompt"] + r["data"] in held_out for _, rows in samples for r in rows)
    last = samples[-1][1]
    assert [r["model"] for r in last] == greedy(out, [r["prompt"] for r in last])
    if tracker == "mlflow":  # the loss curve's picture and the samples, in OUT, where the reader lists them
        from mlflow.tracking import MlflowClient
        run_id = json.load(open(out / "trackers.json"))["mlflow"]["id"]
        client = MlflowClient(f"sqlite:///{out}/mlflow.db")
        assert client.get_run(run_id).info.artifact_uri.startswith((out / "mlruns").as_uri())
        assert [a.path for a in client.list_artifacts(run_id)] == ["loss.png", "samples.json"]
    # steps 5-6 again from the step-4 checkpoint: the same values (resume is exact), into the same tracker run
    r = train(out, *RUN, "--report-to", tracker, "--resume", out / "ckpt-step-4", env=env)
    assert "resumed from" in r.stderr
    assert_same(READ[tracker](out), metrics(out), SAME_AGAIN)
    assert [step for step, _ in SAMPLES[tracker](out)] == val_steps


def test_the_config_reaches_each_tracker_once(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    out = tmp_path / "out"
    train(out, "--max-steps", "2", "--learning-rate", "0.002", "--report-to", "mlflow")
    run_id = json.load(open(out / "trackers.json"))["mlflow"]["id"]
    params = MlflowClient(f"sqlite:///{out}/mlflow.db").get_run(run_id).data.params
    assert params["training.learning_rate"] == "0.002" and params["model.name"] == "gpt2"


def test_a_missing_tracker_is_one_line_naming_its_package(tmp_path):
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "mlflow.py").write_text("raise ModuleNotFoundError('hidden for this test')\n")
    r = run("TRAIN.py", "--config", "tests/tiny.yaml", "--out", tmp_path / "out", "--report-to", "mlflow",
            env={"PYTHONPATH": str(tmp_path / "hide")})
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    assert r.stderr.strip().splitlines() == ["error: --report-to mlflow needs the mlflow package - pip install mlflow"]


def test_a_tracker_that_cannot_start_is_a_warning_and_training_goes_on(tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "out"  # nothing listens on port 9: MLflow cannot reach its server
    r = train(out, "--max-steps", "2", "--report-to", "mlflow",
              env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert "warning: --report-to mlflow could not start" in r.stderr
    assert (out / "model.safetensors").exists() and len(metrics(out)) > 0


def test_a_tracker_that_fails_mid_run_is_a_warning_and_training_goes_on(tmp_path):
    """MLflow's store broken after the run has begun reporting: one warning line, every step still trained and
    in metrics.jsonl, the model saved."""
    pytest.importorskip("mlflow")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "TRAIN.py", "--config", "tests/tiny.yaml", "--out", str(out),
                             "--max-steps", "400", "--log-every", "1", "--save-every", "0", "--report-to", "mlflow"],
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 5 * 7) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    open(out / "mlflow.db", "w").close()  # the store's file emptied under the running tracker
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning: --report-to mlflow")]
    assert len(warnings) == 1 and "it gets no more of this run" in warnings[0]
    assert max(step for step, _, _ in metrics(out)) == 400 and (out / "model.safetensors").exists()
