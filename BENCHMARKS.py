"""Benchmark scores from lm-evaluation-harness's own evaluator (lm_eval.simple_evaluate) on a model LLM-MINI has
loaded (a model folder, a LoRA adapter folder merged into its base, a .gguf), in LLM-MINI's device and
precision: the tasks people quote (hellaswag, arc_easy, mmlu, gsm8k, …) or your own, defined from local files
(`dataset_path: json`) in a folder given to --include-path. lm-eval is optional and imported only here.
"""
import json
import os

from REPORT import UserError, first_line, log, need


def evaluate(model, tokenizer, tasks, *, num_fewshot=None, limit=None, include_path=None, batch_size=8):
    """lm-eval's results for the tasks (its whole dict: results, configs, n-shot, the samples with each choice's
    log-likelihood), or a one-line UserError for a task that does not exist or whose data cannot be read."""
    lm_eval = need("lm_eval", "--tasks", "lm-eval")
    from lm_eval.models.huggingface import HFLM  # optional, as lm_eval above
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(f"--tasks {','.join(unknown)}: not an lm-eval task" + (
            f" (nor one in {include_path})" if include_path else "") + " - `lm_eval ls tasks` lists them; your own "
            "task is a YAML file in a folder given to --include-path")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                       task_manager=manager, log_samples=True)
    except (ConnectionError, OSError) as e:  # datasets' and huggingface_hub's errors for an unreachable Hub
        raise UserError(f"--tasks {','.join(tasks)}: the task's data could not be read ({first_line(e, 160)}) - a Hub "
                        "task needs the network or the Hugging Face cache (HF_DATASETS_OFFLINE=1); a task of your "
                        "own reads local files (dataset_path: json, with --include-path)")


def scores(results):
    """{"task/metric": value} of the results' numbers (stderr left out), for metrics.jsonl and the trackers."""
    return {f"{task}/{metric.split(',')[0]}": value for task, metrics in results["results"].items()
            for metric, value in metrics.items()
            if isinstance(value, (int, float)) and "stderr" not in metric and metric != "alias"}


def write(results, path):
    """The results as JSON (lm-eval's own serialisation of what JSON lacks) at `path`. -> lm-eval's table"""
    from lm_eval.utils import handle_non_serializable, make_table  # optional, as lm_eval
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1, default=handle_non_serializable)
    log(f"wrote {path}")
    return make_table(results)


def results_path(model_name):
    """Where EVAL.py --tasks writes the JSON: in a model folder, beside a .gguf file, else here."""
    if os.path.isdir(model_name):
        return os.path.join(model_name, "lm_eval_results.json")
    return model_name + ".lm_eval_results.json" if os.path.isfile(model_name) else "lm_eval_results.json"
