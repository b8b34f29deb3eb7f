"""lm-evaluation-harness drives INFER.py --serve: loglikelihood tasks through local-completions score as its own
hf backend does on the same model directory, generation tasks through local-chat-completions answer as
INFER.py --chat --greedy does. Tasks from local JSONL files, as a user defines their own."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run, serving, train

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lm-eval[api]')")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHOICES = [("Once upon a time, a small fox lived at the edge of a quiet", ["forest.", "table."], 0),
           ("The fox liked to watch the river shine in the morning", ["sun.", "car."], 0),
           ("Every day the fox walked to the", ["river", "moon"], 0),
           ("The cat sat on the", ["mat.", "sky."], 0),
           ("A little girl found a", ["shell", "engine"], 0),
           ("The boy ran to the", ["park.", "number."], 1)]
QUESTIONS = ["What is LLM-MINI?", "Which file trains the model?", "How do I resume a run?"]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A 2-choice loglikelihood task and a generate_until task, each a YAML file beside its JSONL data."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "choice.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                               for q, c, a in CHOICES))
    (root / "ask.jsonl").write_text("".join(json.dumps({"question": q, "answer": ""}) + "\n" for q in QUESTIONS))
    (root / "choice.yaml").write_text(TASK.format(name="mini_choice", data=root / "choice.jsonl") + """\
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""")
    (root / "ask.yaml").write_text(TASK.format(name="mini_ask", data=root / "ask.jsonl") + """\
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (root / "text.yaml").write_text(TASK.format(name="mini_text", data=root / "choice.jsonl") + """\
output_type: loglikelihood_rolling
doc_to_text: "{{question}}"
doc_to_target: "{{question}}"
metric_list:
  - metric: bits_per_byte
""")
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval") / "out"
    train(out, "--data", "data/chat.jsonl", "tests/data/train.txt", "--max-length", "128", "--config-overrides",
          "{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 1024}")
    return out


def lm_eval(out, *args):
    """Run lm-eval's command line; -> the per-sample records it logged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "lm_eval", *map(str, args), "--output_path", out, "--log_samples"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (samples,) = glob.glob(os.path.join(out, "*", "samples_*.jsonl"))
    return sorted((json.loads(line) for line in open(samples)), key=lambda s: s["doc_id"])


def test_multiple_choice_through_the_server_scores_as_lm_evals_hf_backend(model, tasks, tmp_path):
    common = ["--tasks", "mini_choice", "--include_path", tasks]
    with serving(model) as url:  # 4 concurrent requests: the server batches them
        served = lm_eval(tmp_path / "api", "--model", "local-completions", "--model_args",
                         f"model={model},base_url={url}/v1/completions,num_concurrent=4,tokenized_requests=True",
                         *common)
    direct = lm_eval(tmp_path / "hf", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                     "--device", "cpu", *common)
    assert [s["acc"] for s in served] == [s["acc"] for s in direct]
    for a, b in zip(served, direct):
        for (got, _), (want, _) in zip(a["filtered_resps"], b["filtered_resps"]):
            assert abs(float(got) - float(want)) <= 1e-4, (a["doc"], got, want)


def test_generation_through_chat_completions_answers_as_infer_chat_greedy(model, tasks, tmp_path):
    with serving(model) as url:
        samples = lm_eval(tmp_path / "chat", "--model", "local-chat-completions", "--model_args",
                          f"model={model},base_url={url}/v1/chat/completions,num_concurrent=2",
                          "--apply_chat_template", "--tasks", "mini_ask", "--include_path", tasks)
    for s in samples:
        r = run("INFER.py", "--model", model, "--chat", "--greedy", "--prompt", s["doc"]["question"],
                "--max-new-tokens", "16", "--stop", "\n")
        assert r.returncode == 0, r.stderr
        assert s["filtered_resps"][0] == r.stdout[:-1] and r.stdout[:-1], (s["doc"], r.stdout)


def test_eval_py_tasks_scores_as_lm_evals_hf_backend(model, tasks, tmp_path):
    """EVAL.py --tasks runs lm-eval's own evaluator on the model it loads: the same accuracy and per-choice
    log-likelihoods as `lm_eval --model hf` on the same folder; the table on stdout, the JSON in the folder."""
    r = run("EVAL.py", "--model", model, "--tasks", "mini_choice", "--include-path", tasks,
            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(model / "lm_eval_results.json"))
    ours = sorted(results["samples"]["mini_choice"], key=lambda s: s["doc_id"])
    direct = lm_eval(tmp_path / "hf", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                     "--device", "cpu", "--tasks", "mini_choice", "--include_path", tasks)
    assert [s["acc"] for s in ours] == [s["acc"] for s in direct] and len(ours) == len(CHOICES)
    for a, b in zip(ours, direct):
        for (got, _), (want, _) in zip(a["filtered_resps"], b["filtered_resps"]):
            assert abs(float(got) - float(want)) <= 1e-4, (a["doc"], got, want)
    acc = results["results"]["mini_choice"]["acc,none"]
    assert acc == sum(s["acc"] for s in direct) / len(direct)
    row = next(line for line in r.stdout.splitlines() if line.startswith("|mini_choice|"))  # lm-eval's table
    cells = [c.strip() for c in row.split("|")]
    assert cells[5] == "acc" and float(cells[7]) == pytest.approx(acc, abs=1e-4)


def test_eval_py_names_a_task_that_does_not_exist(model, tasks):
    r = run("EVAL.py", "--model", model, "--tasks", "mini_choise", "--include-path", tasks)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --tasks mini_choise: not an "
                                                                              "lm-eval task")


def test_a_hub_task_without_the_network_is_one_line_saying_so(model):
    """arc_easy's data is on the Hub; offline (as HF_HUB_OFFLINE says, without waiting for timeouts) and not in
    the cache: one line naming the task and what it needs, no traceback."""
    r = run("EVAL.py", "--model", model, "--tasks", "arc_easy", "--limit", "2",
            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(model.parent / "empty-hf-home")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --tasks arc_easy: the task's data could not be read") and "needs the network" in error


def test_task_scores_are_logged_during_training(tasks, tmp_path):
    """--eval-tasks: the evaluator runs on the weights of steps 2 and 4 (a rolling log-likelihood task: a score
    that moves as the model trains), on the first 3 of its 6 documents; the last score is what EVAL.py --tasks
    --limit 3 gives the saved model."""
    out = tmp_path / "out"
    train(out, "--max-steps", "4", "--save-every", "0", "--eval-tasks", "mini_text", "--eval-tasks-path", tasks,
          "--eval-tasks-every", "2", "--eval-tasks-limit", "3", env={"HF_DATASETS_OFFLINE": "1"})
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "tasks/mini_text/bits_per_byte" in line]
    assert [r["step"] for r in rows] == [2, 4] and all(r["tasks_s"] > 0 for r in rows)
    assert rows[1]["tasks/mini_text/bits_per_byte"] < rows[0]["tasks/mini_text/bits_per_byte"]  # it trained
    r = run("EVAL.py", "--model", out, "--tasks", "mini_text", "--include-path", tasks, "--limit", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    scored = json.load(open(out / "lm_eval_results.json"))["results"]["mini_text"]["bits_per_byte,none"]
    assert rows[1]["tasks/mini_text/bits_per_byte"] == pytest.approx(scored, rel=1e-6)
