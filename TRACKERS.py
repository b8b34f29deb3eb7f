"""The trackers a training run reports to (--report-to tensorboard wandb trackio mlflow), each through its own
library, imported only when named: each receives what OUT/metrics.jsonl receives, under the same names and at
the same steps (each draws its own curves from them), the resolved config once at the start, a few generated
samples at each validation (EVAL.samples: a table, or text for TensorBoard) and the picture of the loss curve
(OUT/loss.png) at the end. Rank 0 only.

A resumed run continues each tracker's run: OUT/trackers.json keeps the run's name, each tracker's run id and the
last step each received, and the steps a resumed run trains again (bit-exactly the same: docs/training.md) are
not sent twice. A tracker that fails mid-run (a full disk, no network for W&B online) is one warning and is
dropped; the training run goes on.
"""
import contextlib
import dataclasses
import json
import os
import pathlib
import sys
import time
import uuid

from REPORT import first_line, log, need

STATE = "trackers.json"


@dataclasses.dataclass
class Tracker:
    name: str
    client: object      # what the tracker's library returned: a SummaryWriter, a wandb Run, the trackio module, a run id
    sent_upto: int      # the last step it received in an earlier process (-1: none)


def check(names):
    """Fail in one line, before anything loads, naming the package a named tracker needs."""
    for name in names:
        need("torch.utils.tensorboard" if name == "tensorboard" else name, f"--report-to {name}", name)


def open_all(names, out, run_name, project, config, resumed):
    """The trackers, each with its run started (or continued, when `resumed` and OUT/trackers.json names it)."""
    path = os.path.join(out, STATE)
    state = json.load(open(path)) if resumed and os.path.exists(path) else {}
    name = state.get("run_name") or run_name or f"{os.path.basename(os.path.abspath(out))}-{time.strftime('%Y%m%d-%H%M%S')}"
    trackers = []
    for tracker in names:
        mine = state.get(tracker, {})
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout is for generated text; some trackers print there
                client, run_id = START[tracker](out, name, project, config, mine.get("id"))
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start must not stop the training run
            log(f"warning: --report-to {tracker} could not start ({type(e).__name__}: {first_line(e, 160)}); training "
                "goes on without it")
            continue
        trackers.append(Tracker(tracker, client, mine.get("step", -1)))
        state[tracker] = {"id": run_id, "step": mine.get("step", -1)}
    state["run_name"] = name
    save_state(out, state)
    log(f"reporting to {', '.join(t.name for t in trackers) or 'no tracker'} as run {name!r} (project {project!r})")
    return trackers


def save_state(out, state):
    with open(os.path.join(out, STATE + ".tmp"), "w") as fh:
        json.dump(state, fh)
    os.replace(os.path.join(out, STATE + ".tmp"), os.path.join(out, STATE))


def send(trackers, out, row, samples=()):
    """One metrics.jsonl row (and the samples generated at its step) to every tracker that has not received its
    step; a failing tracker is dropped."""
    step, values = row["step"], {k: v for k, v in row.items() if k != "step"}
    for t in list(trackers):
        if step <= t.sent_upto:
            continue
        try:
            with contextlib.redirect_stdout(sys.stderr):
                LOG[t.name](t.client, values, step)
                if samples:
                    TABLE[t.name](t.client, samples, step)
        except Exception as e:  # noqa: BLE001 - a tracker's failure must not end the training run
            log(f"warning: --report-to {t.name} failed ({type(e).__name__}: {first_line(e, 160)}); it gets no more of this run")
            trackers.remove(t)
    if trackers:
        state = json.load(open(os.path.join(out, STATE)))
        save_state(out, state | {t.name: state[t.name] | {"step": step} for t in trackers})


def close_all(trackers, image=None):
    """Finish each tracker's run, after sending it the image file (the loss curve), where there is one."""
    for t in trackers:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                if image:
                    IMAGE[t.name](t.client, image)
                FINISH[t.name](t.client)
        except Exception as e:  # noqa: BLE001 - the run is over; say so and go on
            log(f"warning: --report-to {t.name} did not close cleanly ({type(e).__name__}: {first_line(e, 160)})")


def curve_name(path):
    """loss_curve (reward_curve for GRPO's reward.png): not the name of a scalar it would be drawn with."""
    return os.path.splitext(os.path.basename(path))[0] + "_curve"


def image_tensorboard(writer, path):
    from matplotlib.image import imread  # optional, as the picture itself
    writer.add_image(curve_name(path), imread(path)[..., :3], dataformats="HWC")


def image_wandb(run, path):
    import wandb
    run.log({curve_name(path): wandb.Image(path)})


def image_trackio(trackio, path):
    trackio.log({curve_name(path): trackio.Image(path)})


def image_mlflow(run_id, path):
    import mlflow
    mlflow.log_artifact(path)


def table_tensorboard(writer, samples, step):
    """One text per validation (Markdown: TensorBoard's TEXT tab renders it), each sample's parts as code."""
    text = "\n\n".join(f"**{k}**\n\n```\n{v}\n```" for row in samples for k, v in row.items())
    writer.add_text("samples", text, step)
    writer.flush()


def table_wandb(run, samples, step):
    import wandb
    run.log({"samples": wandb.Table(columns=list(samples[0]), data=[list(r.values()) for r in samples])}, step=step)


def table_trackio(trackio, samples, step):
    trackio.log({"samples": trackio.Table(columns=list(samples[0]), data=[list(r.values()) for r in samples])},
                step=step)


def table_mlflow(run_id, samples, step):
    """All validations' samples in one table (samples.json, MLflow appends to it), each row with its step."""
    import mlflow
    mlflow.log_table({"step": [step] * len(samples), **{k: [r[k] for r in samples] for k in samples[0]}},
                     "samples.json", run_id=run_id)


def start_tensorboard(out, name, project, config, run_id):
    from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard
    writer = SummaryWriter(os.path.join(out, "tensorboard", name))
    if run_id is None:  # the config once, as text
        writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
    return writer, name


def start_wandb(out, name, project, config, run_id):
    import wandb  # optional; WANDB_MODE=offline keeps the run on disk (wandb sync uploads it later)
    run_id = run_id or uuid.uuid4().hex[:8]
    run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=out, config=config)
    return run, run_id


def start_trackio(out, name, project, config, run_id):
    import trackio  # optional; one SQLite file per project under TRACKIO_DIR (~/.cache/huggingface/trackio)
    trackio.init(project=project, name=name, config=config, resume="allow" if run_id else "never",
                 auto_log_cpu=False, auto_log_gpu=False)
    return trackio, name


def start_mlflow(out, name, project, config, run_id):
    import mlflow  # optional; MLFLOW_TRACKING_URI, else a SQLite store in OUT (MLflow 3 refuses its old file store)
    in_out = not os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(out)}/mlflow.db")
    if in_out and not mlflow.get_experiment_by_name(project):
        # its files (the curve, the samples) in OUT too, not in ./mlruns wherever training was started
        mlflow.create_experiment(project, artifact_location=pathlib.Path(out, "mlruns").absolute().as_uri())
    mlflow.set_experiment(project)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
    if run_id is None:
        mlflow.log_params({f"{sec}.{k}": v for sec, values in config.items() for k, v in values.items()})
    return run.info.run_id, run.info.run_id


def log_tensorboard(writer, values, step):
    for k, v in values.items():
        writer.add_scalar(k, v, step)
    writer.flush()


def log_mlflow(values, step):
    import mlflow
    mlflow.log_metrics(values, step=step)


def end_mlflow():
    import mlflow
    mlflow.end_run()


TABLE = {"tensorboard": table_tensorboard, "wandb": table_wandb, "trackio": table_trackio, "mlflow": table_mlflow}
IMAGE = {"tensorboard": image_tensorboard, "wandb": image_wandb, "trackio": image_trackio, "mlflow": image_mlflow}
START = {"tensorboard": start_tensorboard, "wandb": start_wandb, "trackio": start_trackio, "mlflow": start_mlflow}
LOG = {"tensorboard": log_tensorboard, "wandb": lambda run, values, step: run.log(values, step=step),
       "trackio": lambda trackio, values, step: trackio.log(values, step=step),
       "mlflow": lambda run_id, values, step: log_mlflow(values, step)}
FINISH = {"tensorboard": lambda writer: writer.close(), "wandb": lambda run: run.finish(),
          "trackio": lambda trackio: trackio.finish(), "mlflow": lambda run_id: end_mlflow()}
