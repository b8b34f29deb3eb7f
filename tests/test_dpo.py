"""DPO (TRAIN.py --dpo, PREFERENCE.py): the loss, learning a preference, and the loop's exactness."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import BATCHES
import CHAT
import DATA
import PREFERENCE
from conftest import ROOT, run, train, weights

WORDS = "apple river stone cloud green music paper light window garden".split()


def questions(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (4,), generator=g).tolist()) for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny chat model (ChatML), trained without dropout: the model DPO starts from and is compared with."""
    out = tmp_path_factory.mktemp("base") / "out"
    train(out, "--data", "data/chat.jsonl", "--max-length", "128", "--dropout", "0")
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Preference pairs where the chosen answer follows one rule: it says yes."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                        "chosen": [{"role": "assistant", "content": "yes"}],
                                        "rejected": [{"role": "assistant", "content": "no"}]}) + "\n"
                            for q in questions(64, 0)))
    return path


def dpo(out, base, pairs, *args):
    r = run("TRAIN.py", "--model", base, "--data", pairs, "--out", out, "--dpo", "--dtype", "float32", "--device",
            "cpu", "--batch-size", "8", "--max-steps", "6", "--save-every", "3", "--log-every", "1",
            "--learning-rate", "3e-3", "--cache-dir", out.parent / "cache", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl") if "rewards/margins" in line]


def test_loss_and_gradients_equal_separate_forwards_of_each_answer(base, pairs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    seqs = BATCHES.pairs(DATA.token_cache(DATA.local([pairs]), tokenizer, tmp_path), 128)
    reference = torch.randn(4, 2, generator=torch.Generator().manual_seed(3)) - 5.0
    batch = BATCHES.collate(BATCHES.gather(seqs, range(4)), tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    losses, _, _ = PREFERENCE.dpo_loss(PREFERENCE.answer_logps(logits, batch["labels"], batch["position_ids"]),
                                       reference, beta=0.1)
    ours = losses.mean()
    ours_grads = torch.autograd.grad(ours, list(model.parameters()))

    def answer_logp(i, which):  # one answer alone, through plain transformers
        a, b = seqs.segments[seqs.offsets[i] + which]
        ids, mask = torch.as_tensor(seqs.corpus.tokens[a:b].astype("int64")), torch.as_tensor(seqs.corpus.mask[a:b])
        logp = model(input_ids=ids[None]).logits[0, :-1].log_softmax(-1)
        return (logp.gather(1, ids[1:, None])[:, 0] * mask[1:]).sum()
    policy = torch.stack([torch.stack([answer_logp(i, 0), answer_logp(i, 1)]) for i in range(4)])
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    theirs = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    theirs_grads = torch.autograd.grad(theirs, list(model.parameters()))
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=0), (ours, theirs)
    for a, b in zip(ours_grads, theirs_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_it_learns_the_preferred_answer(base, pairs, tmp_path):
    def says_yes(model):
        prompts = "\n".join(questions(8, 1)) + "\n"
        r = run("INFER.py", "--model", model, "--chat", "--greedy", "--each-line", "--max-new-tokens", "3",
                stdin=prompts)
        assert r.returncode == 0, r.stderr
        return sum(line.strip().startswith("yes") for line in r.stdout.splitlines())
    dpo(tmp_path / "out", base, pairs, "--max-steps", "20", "--lora", "--learning-rate", "2e-2")
    first, last = rows(tmp_path / "out")[0], rows(tmp_path / "out")[-1]
    assert last["rewards/accuracies"] > first["rewards/accuracies"] and last["rewards/accuracies"] >= 0.9
    assert last["rewards/margins"] > first["rewards/margins"] > -1
    assert says_yes(tmp_path / "out") > says_yes(base)


def first_moment(out):
    """AdamW's first moment after one step without clipping: (1 - beta1) x the step's gradient."""
    return torch.load(out / "ckpt-step-1" / "training_state.pt", weights_only=True)["optimizer"]["state"]


ONE_STEP = ["--max-steps", "1", "--save-every", "1", "--grad-clip", "0"]


def test_accumulation_equals_one_big_batch(base, pairs, tmp_path):
    dpo(tmp_path / "big", base, pairs, *ONE_STEP)
    dpo(tmp_path / "accum", base, pairs, *ONE_STEP, "--batch-size", "2", "--grad-accum", "4")
    big, accum = first_moment(tmp_path / "big"), first_moment(tmp_path / "accum")
    assert big.keys() == accum.keys()
    for k in big:
        torch.testing.assert_close(accum[k]["exp_avg"], big[k]["exp_avg"], rtol=1e-5, atol=1e-8)
    assert rows(tmp_path / "big")[0]["rewards/margins"] == pytest.approx(rows(tmp_path / "accum")[0]["rewards/margins"],
                                                                        rel=1e-5, abs=1e-7)


def test_resume_is_bit_identical_and_reuses_the_reference(base, pairs, tmp_path):
    dpo(tmp_path / "whole", base, pairs)
    r = dpo(tmp_path / "resumed", base, pairs, "--resume", tmp_path / "whole" / "ckpt-step-3")
    assert "reusing reference log-probabilities" in r.stderr
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_equal_one_process(base, pairs, tmp_path):
    dpo(tmp_path / "one", base, pairs, *ONE_STEP)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "TRAIN.py", "--model", str(base), "--data", str(pairs), "--out", str(tmp_path / "ddp"), "--dpo",
                        "--dtype", "float32", "--device", "cpu", "--batch-size", "4", "--learning-rate", "3e-3",
                        "--log-every", "1", "--cache-dir", str(tmp_path / "cache"), *ONE_STEP],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    one, ddp = first_moment(tmp_path / "one"), first_moment(tmp_path / "ddp")
    for k in one:
        torch.testing.assert_close(ddp[k]["exp_avg"], one[k]["exp_avg"], rtol=1e-5, atol=1e-8)
    assert rows(tmp_path / "ddp")[0]["rewards/accuracies"] == rows(tmp_path / "one")[0]["rewards/accuracies"]


USER, YES, NO = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}, \
    {"role": "assistant", "content": "no"}


@pytest.mark.parametrize("line, error", [
    ({"prompt": "hi", "chosen": "yes"}, 'no "rejected" field'),
    ({"prompt": "hi", "chosen": "yes", "rejected": "yes"}, '"chosen" and "rejected" are the same'),
    ({"chosen": [YES], "rejected": [NO]}, "the prompt has no turns"),
    ({"prompt": [USER], "chosen": [USER], "rejected": [NO]}, "must be assistant messages"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": [YES], "rejected": [NO]}, "role 'robot'"),
])
def test_a_bad_pair_is_one_line_naming_file_and_line(tmp_path, base, line, error):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps(line) + "\n")
    r = run("TRAIN.py", "--model", base, "--data", data, "--out", tmp_path / "out", "--dpo")
    assert r.returncode == 2 and f"{data}:2: " in r.stderr and error in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_dpo_and_the_data_must_agree(tmp_path, base, pairs):
    r = run("TRAIN.py", "--model", base, "--data", pairs, "--out", tmp_path / "a")
    assert r.returncode == 2 and "add --dpo" in r.stderr
    r = run("TRAIN.py", "--model", base, "--data", "data/chat.jsonl", "--out", tmp_path / "b", "--dpo")
    assert r.returncode == 2 and "preference pairs only" in r.stderr


def test_implicit_pairs_share_their_first_turns_as_the_prompt():
    kind, sample = CHAT.parse({"chosen": [USER, YES], "rejected": [USER, NO]}, "f:1")
    assert kind == "preference" and sample == {"prompt": [USER], "chosen": [YES], "rejected": [NO]}


def test_conversational_prompt_completion_trains_on_the_completion_only(base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = [USER, {"role": "assistant", "content": "an earlier answer"}, {"role": "user", "content": "and?"}]
    kind, sample = CHAT.parse({"prompt": prompt, "completion": [YES]}, "f:1")
    [(ids, mask, _)] = CHAT.encode([(kind, sample, "f:1")], tokenizer)
    [(same_ids, last_turn, _)] = CHAT.encode([("messages", {"messages": prompt + [YES]}, "f:1")], tokenizer,
                                             "last_assistant")
    assert ids == same_ids and mask == last_turn and sum(mask) > 0


def test_a_template_that_raises_names_the_pair(tmp_path, base):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(base, model, ignore=shutil.ignore_patterns("ckpt-*"))
    (model / "chat_template.jinja").write_text("{% if messages[-1]['content'] == 'bad' %}{{ raise_exception('no') }}"
                                               "{% endif %}" + (base / "chat_template.jinja").read_text())
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": [USER], "chosen": [YES], "rejected": [NO]}) + "\n" +
                    json.dumps({"prompt": [USER], "chosen": [YES], "rejected": [{"role": "assistant",
                                                                                "content": "bad"}]}) + "\n")
    r = run("TRAIN.py", "--model", model, "--data", data, "--out", tmp_path / "out", "--dpo")
    assert r.returncode == 2 and f"{data}:2: the chat template refused" in r.stderr, r.stderr


def test_the_loss_equals_trls_dpo_trainer(base, tmp_path):
    """On string pairs and a tokenizer without a chat template, both score prompt + answer + EOS the same way
    (with a template TRL also scores the text the template puts after the end-of-turn marker)."""
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl) - TRL's DPOTrainer is compared "
                                            "only where it is")
    from datasets import Dataset
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = None
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that has moved away from the reference
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    lines = [{"prompt": f"Question: {q}? Answer:", "chosen": " yes", "rejected": " no" if i % 2 else " not at all"}
             for i, q in enumerate(questions(4, 2))]
    four = tmp_path / "four.jsonl"
    four.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, use_cpu=True, report_to=[],
                         beta=0.1, bf16=False, max_length=None)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(lines),
                             processing_class=tokenizer)
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    seqs = BATCHES.pairs(DATA.token_cache(DATA.local([four]), tokenizer, tmp_path / "cache"), 128)
    batch = BATCHES.collate(BATCHES.gather(seqs, range(4)), tokenizer.pad_token_id)
    logps = [PREFERENCE.answer_logps(m(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                       use_cache=False).logits, batch["labels"], batch["position_ids"])
             for m in (policy, reference)]
    ours = PREFERENCE.dpo_loss(logps[0], logps[1].detach(), 0.1)[0].mean()
    assert abs(ours.item() - theirs.item()) <= 1e-4, (ours.item(), theirs.item())
