"""GRPO (TRAIN.py --grpo, GRPO.py): advantages, the loss against an independent computation and TRL's, a reward
learned, and the loop's exactness (accumulation, two ranks, resume), LoRA, conversations and bad input."""
import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import GRPO
import LOSS
from CONFIG import TrainingCfg
from conftest import ROOT, TINY, run, same_weights, train

REWARDS = '''
def has_e(prompts, completions, **kw):  # the share of e's: a tiny model learns to write more of them
    return [c.count("e") / max(1, len(c)) for c in completions]

def echo_answer(prompts, completions, answer, **kw):  # a column of the prompt rows, as TRL passes it
    return [float(a in c) if a != "skip" else None for a, c in zip(answer, completions)]

def chat_shaped(prompts, completions, **kw):  # conversations: prompts and completions are lists of messages
    assert all(isinstance(p, list) and isinstance(c, list) and c[0]["role"] == "assistant"
               for p, c in zip(prompts, completions))
    return [len(c[0]["content"]) / 100 for c in completions]

def broken(prompts, completions, answer, **kw):
    return [1 / int(a) for a in answer]  # a ZeroDivisionError on the row whose answer is 0

def too_few(prompts, completions, **kw):
    return [1.0]
'''
RUN = ["--grpo", "--max-completion-length", "12", "--num-generations", "4", "--batch-size", "8", "--log-every", "1",
       "--learning-rate", "5e-3", "--warmup-steps", "0", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GPT-2 trained a little on tests/data, without dropout; prompts and a reward file beside it."""
    root = tmp_path_factory.mktemp("grpo")
    train(root / "base", "--dropout", "0", "--max-steps", "60", "--save-every", "0")
    texts = [line.split() for line in open(f"{ROOT}/tests/data/train.txt") if len(line.split()) > 4][:40]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": " ".join(words[:4]), "answer": str(i % 3)})
                                                + "\n" for i, words in enumerate(texts)))
    (root / "rewards.py").write_text(REWARDS)
    return root


def grpo(out, base, *args, data=None):
    r = run("TRAIN.py", "--model", base / "base", "--data", data or base / "prompts.jsonl", "--out", out,
            "--reward", f"{base}/rewards.py:has_e", *RUN, *map(str, args))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl") if "reward" in line]


def test_advantages_are_relative_to_the_group_and_skip_missing_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, math.nan, 4.0], dtype=torch.float64)
    adv, std = GRPO.group_advantages(rewards, 4)
    first = (rewards[:4] - 0.5) / (rewards[:4].std() + 1e-4)  # Bessel-corrected, as torch.std and TRL's nanstd
    second = torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64)
    assert torch.allclose(adv[:4], first)
    assert torch.allclose(adv[[4, 5, 7]], (second - second.mean()) / (second.std() + 1e-4)) and adv[6] == 0
    assert torch.allclose(std, torch.stack([rewards[:4].std(), second.std()]))


def micro_batch(tokenizer, prompt_len=5, seed=0):
    """Four prompts of equal length (no left padding: TRL's forward passes no position ids) with completions of
    unequal length, right-padded; fixed advantages and reference log-probabilities."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, len(tokenizer), (4, prompt_len), generator=g)
    lengths = [6, 3, 9, 1]
    completions = torch.randint(3, len(tokenizer), (4, 9), generator=g)
    mask = torch.stack([torch.arange(9) < n for n in lengths]).long()
    return prompts, completions * mask, mask, torch.tensor([1.0, -0.5, 0.25, -2.0]), torch.randn(4, 9, generator=g) - 4


def ours(model, prompts, completions, mask, advantages, reference, beta, temperature, epsilon=0.2):
    """GRPO.loss through the Scorer (chunked head) on the same inputs; -> (loss, gradients by name)."""
    t = TrainingCfg(grpo_beta=beta, grpo_temperature=temperature, grpo_epsilon=epsilon)
    objective = GRPO.GRPO.__new__(GRPO.GRPO)  # its loss alone: no data, no generation
    objective.t, objective.names = t, ("clip_ratio/region_mean",) + (("kl",) if beta else ())
    ids = torch.cat([prompts, completions], 1)
    labels = torch.cat([torch.full_like(prompts, -100), completions.masked_fill(mask == 0, -100)], 1)
    # the Scorer's (B, T) log-probabilities sit at the position before each token; the reference there too
    ref = torch.cat([torch.zeros(4, prompts.shape[1] - 1), reference, torch.zeros(4, 1)], 1)
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).repeat(4, 1), "labels": labels,
             "advantages": advantages, "reference": ref}
    model.zero_grad(set_to_none=True)
    loss, _ = objective.loss(LOSS.Scorer(model, chunked=True), batch, torch.tensor(float(mask.sum())))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def independent(model, prompts, completions, mask, advantages, reference, beta, temperature, epsilon=0.2):
    """The same loss written out from the model's full logits, TRL's formulas (dapo, token-level ratio)."""
    model.zero_grad(set_to_none=True)
    ids = torch.cat([prompts, completions], 1)
    logits = model(input_ids=ids).logits[:, prompts.shape[1] - 1:-1].float() / temperature
    logp = logits.log_softmax(-1).gather(-1, completions[..., None]).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)
    if beta:
        per_token = per_token + beta * (torch.exp(reference - logp) - (reference - logp) - 1) * ratio
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6), (la, lb)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-5, atol=1e-5 * gb[n].abs().max()), n


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.04, 0.7)])
def test_loss_and_gradients_equal_an_independent_computation(base, beta, temperature):
    model = AutoModelForCausalLM.from_pretrained(base / "base", dtype=torch.float32).eval()
    inputs = micro_batch(AutoTokenizer.from_pretrained(base / "base"))
    assert_close(ours(model, *inputs, beta, temperature), independent(model, *inputs, beta, temperature))


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.04, 0.7)])
def test_the_loss_equals_trls_grpo_trainer(base, tmp_path, beta, temperature):
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl) - TRL's GRPOTrainer is compared "
                                            "only where it is")
    from datasets import Dataset
    model = AutoModelForCausalLM.from_pretrained(base / "base", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base / "base")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none", beta=beta,
                          temperature=temperature, per_device_train_batch_size=4, num_generations=4)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                              train_dataset=Dataset.from_list([{"prompt": "a b"}] * 4), processing_class=tokenizer)
    prompts, completions, mask, advantages, reference = micro_batch(tokenizer)
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
              "completion_mask": mask, "advantages": advantages, "num_items_in_batch": mask.sum(),
              "ref_per_token_logps": reference}
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    theirs = theirs.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    model.eval()  # no dropout in the tiny model: the same forward either way
    assert_close(ours(model, prompts, completions, mask, advantages, reference, beta, temperature), theirs)


def test_a_tiny_model_learns_a_reward_and_logs_as_trl(base, tmp_path):
    r = grpo(tmp_path / "out", base, "--max-steps", "30")
    got = rows(tmp_path / "out")
    rewards = [row["reward"] for row in got]
    assert len(rewards) == 30 and sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards
    for name in ("reward", "reward_std", "rewards/has_e/mean", "frac_reward_zero_std", "completions/mean_length",
                 "clip_ratio/region_mean", "prepare_s", "train_s"):
        assert name in got[0], name
    assert all(0 < row["completions/mean_length"] <= 12 and row["prepare_s"] > 0 for row in got)
    assert "30 steps" in r.stderr and "40 prompts" in r.stderr


def test_accumulation_and_two_ranks_give_the_one_big_batch_weights(base, tmp_path):
    grpo(tmp_path / "one", base, "--max-steps", "3")
    grpo(tmp_path / "accum", base, "--max-steps", "3", "--batch-size", "4", "--grad-accum", "2")
    # atol 1e-5: AdamW turns the float noise of a zero gradient (GPT-2's key bias: softmax ignores it) into steps
    assert same_weights(tmp_path / "accum", tmp_path / "one", rtol=1e-5, atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "TRAIN.py", "--model", str(base / "base"), "--data", str(base / "prompts.jsonl"),
                        "--out", str(tmp_path / "ddp"), "--reward", f"{base}/rewards.py:has_e", *RUN,
                        "--max-steps", "3", "--batch-size", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_weights(tmp_path / "ddp", tmp_path / "one", rtol=1e-5, atol=1e-5)
    assert [row["reward"] for row in rows(tmp_path / "ddp")] == pytest.approx(
        [row["reward"] for row in rows(tmp_path / "one")], rel=1e-6)


def test_resume_is_bit_identical(base, tmp_path):
    grpo(tmp_path / "straight", base, "--max-steps", "4", "--save-every", "2")
    grpo(tmp_path / "resumed", base, "--max-steps", "4", "--save-every", "2", "--resume",
         tmp_path / "straight" / "ckpt-step-2")
    assert same_weights(tmp_path / "resumed", tmp_path / "straight")


def test_lora_trains_the_adapter_and_the_kl_reference_is_the_base(base, tmp_path):
    grpo(tmp_path / "lora", base, "--max-steps", "2", "--lora", "--grpo-beta", "0.04")
    got = rows(tmp_path / "lora")
    assert "kl" in got[0] and got[0]["kl"] == pytest.approx(0.0, abs=1e-6) and got[1]["kl"] > 0  # moved from the base
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()


def test_conversational_prompts_and_columns_reach_the_rewards_as_trl_gives_them(base, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Say {i}"}], "answer": str(i)})
                             + "\n" for i in range(8)))
    r = run("TRAIN.py", "--model", base / "base", "--data", chats, "--out", tmp_path / "out", *RUN, "--max-steps", "1",
            "--reward", f"{base}/rewards.py:chat_shaped", "--reward", f"{base}/rewards.py:echo_answer",
            "--reward-weights", "1", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    row = rows(tmp_path / "out")[0]
    assert row["reward"] == pytest.approx(row["rewards/chat_shaped/mean"] + 0.5 * row["rewards/echo_answer/mean"],
                                          abs=0.05)


@pytest.mark.parametrize("args, message", [
    (["--reward", "{b}/nope.py:has_e"], "nope.py: no such reward file (--reward {b}/nope.py:has_e)"),
    (["--reward", "{b}/rewards.py:has_f"], "rewards.py: no function 'has_f' (--reward {b}/rewards.py:has_f); it has: "
                                           "has_e, echo_answer, chat_shaped, broken, too_few - did you mean 'has_e'?"),
    (["--reward", "{b}/rewards.py:broken"], "--reward {b}/rewards.py:broken: ZeroDivisionError: division by zero (on "
                                            "a completion of the prompt at {b}/prompts.jsonl:"),
    (["--reward", "{b}/rewards.py:too_few"], "--reward {b}/rewards.py:too_few: returned 1 rewards for 8 completions"),
    (["--reward", "{b}/rewards.py"], "training.reward: '{b}/rewards.py' - give a Python file and a function in it"),
    ([], "training.reward: --grpo needs at least one reward function"),
    (["--reward", "{b}/rewards.py:has_e", "--batch-size", "6"], "must be a multiple of num_generations (4)"),
    (["--reward", "{b}/rewards.py:has_e", "--data", "tests/data/train.jsonl"],
     "tests/data/train.jsonl: holds text samples, but --grpo trains on prompts only"),
])
def test_bad_input_is_one_line(base, tmp_path, args, message):
    argv = ["--model", base / "base", "--data", base / "prompts.jsonl", "--out", tmp_path / "out", *RUN, "--max-steps",
            "1"] + [a.format(b=base) for a in args]
    r = run("TRAIN.py", *argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert message.format(b=base) in r.stderr, r.stderr[-2000:]


def test_sft_refuses_prompt_only_rows_naming_grpo(base, tmp_path):
    r = run("TRAIN.py", "--config", TINY, "--data", base / "prompts.jsonl", "--out", tmp_path / "out")
    assert r.returncode == 2 and "holds prompts alone" in r.stderr and "add --grpo" in r.stderr


def test_weights_change_only_where_the_reward_pushes(base, tmp_path):
    """A reward that is the same for every completion gives zero advantages: the weights do not move."""
    flat = tmp_path / "flat.py"
    flat.write_text("def same(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    r = run("TRAIN.py", "--model", base / "base", "--data", base / "prompts.jsonl", "--out", tmp_path / "out", *RUN,
            "--max-steps", "2", "--reward", f"{flat}:same", "--weight-decay", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert rows(tmp_path / "out")[0]["frac_reward_zero_std"] == 1.0
    assert same_weights(tmp_path / "out", base / "base")


def test_the_documented_example_builds_its_prompts_and_checks_names(tmp_path):
    r = subprocess.run([sys.executable, "docs/grpo_names.py", "data/train.jsonl", "5"], cwd=ROOT, capture_output=True,
                       text=True)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and len(rows) == 5 and all("Answer with just their name" in row["prompt"][0]["content"]
                                                        and row["passage"] in row["prompt"][0]["content"] for row in rows)
    sys.path.insert(0, f"{ROOT}/docs")
    import grpo_names
    passage = ["Lady Russell, indeed, was fond of Anne."]
    said = lambda text: [[{"role": "assistant", "content": text}]]  # noqa: E731
    assert grpo_names.name_only(None, said("Lady Russell."), passage) == [1.0]
    assert grpo_names.name_only(None, said("The passage mentions Lady Russell."), passage) == [0.0]
    assert grpo_names.name_only(None, said("Mr Darcy"), passage) == [0.0]  # not in the passage
    assert grpo_names.mentions(None, said("The passage mentions Lady Russell."), passage) == [1.0]


def test_sampling_ignores_what_the_models_generation_config_would_change(base, tmp_path):
    """A repetition penalty or n-gram ban in generation_config.json would sample from another distribution than
    the one the loss scores: GRPO samples as TRL does, from the temperature-scaled policy alone."""
    import shutil
    shutil.copytree(base / "base", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps(
        config | {"repetition_penalty": 5.0, "no_repeat_ngram_size": 2}))
    grpo(tmp_path / "plain", base, "--max-steps", "1")
    r = run("TRAIN.py", "--model", tmp_path / "model", "--data", base / "prompts.jsonl", "--out", tmp_path / "penalised",
            "--reward", f"{base}/rewards.py:has_e", *RUN, "--max-steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert rows(tmp_path / "penalised")[0]["reward"] == rows(tmp_path / "plain")[0]["reward"]


def test_a_column_named_like_a_reward_argument_is_refused_and_eval_refuses_prompts(base, tmp_path):
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps({"prompt": "a b", "completions": 3}) + "\n")
    r = run("TRAIN.py", "--model", base / "base", "--data", clash, "--out", tmp_path / "out",
            "--reward", f"{base}/rewards.py:has_e", *RUN, "--max-steps", "1")
    assert r.returncode == 2 and f"{clash}:1: a column named 'completions'" in r.stderr
    r = run("EVAL.py", "--model", base / "base", "--data", base / "prompts.jsonl")
    assert r.returncode == 2 and "holds prompts alone - there is no answer to score" in r.stderr
