"""Conversations: the formats, target masks from any chat template, packing that keeps documents apart,
exact accumulation/resume/EVAL on conversation data, and INFER.py --chat rendering what training saw."""
import json
import math
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from BATCHES import collate, gather, sequences
from CHAT import CHATML, encode, end_of_turn
from DATA import iter_texts, local, read_samples, token_cache
from REPORT import UserError
from TOKENIZER import train_tokenizer
from conftest import run, train

CHAT = "data/chat.jsonl"
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye!"}]
# ChatML with {% generation %} markers, so transformers itself can say which tokens are the assistant's
MARKED = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    """A scratch BPE with ChatML's markers as special tokens, as TRAIN.py builds for conversation data."""
    return train_tokenizer(iter_texts(local([CHAT, "tests/data/train.txt"])), 400, chat=True)


def lines(tmp_path, *objs, name="c.jsonl"):
    p = tmp_path / name
    p.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return str(p)


def test_each_format_parses_and_extra_keys_are_ignored(tmp_path):
    msgs = [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}]
    got = [(k, s) for k, s, _ in read_samples(*local([lines(tmp_path, {"messages": msgs, "id": 3})]))]
    assert got == [("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})]
    got = [s for _, s, _ in read_samples(*local([lines(tmp_path, {"prompt": "p", "completion": "c", "meta": 1})]))]
    assert got == [{"prompt": "p", "completion": "c"}]
    alpaca = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "output": "hi"}]
    got = [s for _, s, _ in read_samples(*local([lines(tmp_path, *alpaca)]))]
    assert got == [{"prompt": "Add.\n\n2 and 3", "completion": "5"}, {"prompt": "Say hi.", "completion": "hi"}]


@pytest.mark.parametrize("obj, message", [
    ({"messages": "hi"}, r"c.jsonl:2: \"messages\" must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"c.jsonl:2: message 1 has no string \"content\""),
    ({"messages": [{"role": "user", "content": 5}]}, r"c.jsonl:2: message 1 has no string \"content\""),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"c.jsonl:2: message 1 has role 'bot' - use one of system"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"c.jsonl:2: the conversation has no assistant message"),
    ({"text": "plain"}, r"c.jsonl:2: a text sample among messages samples \(the first at .*c.jsonl:1\)"),
    ({"prompt": "p"}, r"c.jsonl:2: no \"completion\" field"),
])
def test_bad_conversations_name_file_and_line(tmp_path, obj, message):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    if "prompt" in obj:
        good = {"prompt": "p", "completion": "c"}
    with pytest.raises(UserError, match=message):
        list(read_samples(*local([lines(tmp_path, good, obj)])))


def test_a_template_that_raises_is_one_line_naming_the_sample(tmp_path, tok):
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    try:
        samples = list(read_samples(*local([lines(tmp_path, {"messages": CONVERSATION})])))
        with pytest.raises(UserError, match=r"c.jsonl:1: the chat template refused this conversation \(no system role\)"):
            encode(samples, tok)
    finally:
        tok.chat_template = CHATML


def pieces_mask(tok, messages, targets):
    """Independent of CHAT.py: ChatML assembled piece by piece, each tokenized alone, `targets` saying which
    message's content and end marker are trained on."""
    ids, mask = [], []
    for i, m in enumerate(messages):
        for text, on in ((f"<|im_start|>{m['role']}\n", False), (m["content"] + "<|im_end|>", i in targets), ("\n", False)):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids, mask = ids + piece, mask + [int(on)] * len(piece)
    return ids, [0] + mask[1:]


def test_target_masks_equal_an_independent_render_with_and_without_generation_markers(tok):
    sample = [("messages", {"messages": CONVERSATION}, "x:1")]
    ids, mask, _ = encode(sample, tok)[0]  # the default ChatML: no {% generation %} markers
    assert (ids, mask) == pieces_mask(tok, CONVERSATION, targets={2, 4})
    assert encode(sample, tok, "last_assistant")[0][:2] == pieces_mask(tok, CONVERSATION, targets={4})
    assert encode(sample, tok, "all")[0][1] == [0] + [1] * (len(ids) - 1)
    tok.chat_template = MARKED
    try:
        marked = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert encode(sample, tok)[0][:2] == (marked["input_ids"], marked["assistant_masks"])
    finally:
        tok.chat_template = CHATML


def test_the_end_of_turn_token_is_a_target_and_user_tokens_never_are(tok):
    ids, mask, _ = encode([("messages", {"messages": CONVERSATION}, "x:1")], tok)[0]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    targets = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(targets) == "Hello there.<|im_end|>Goodbye!<|im_end|>"
    assert targets.count(im_end) == 2 and end_of_turn(tok) == ("<|im_end|>", im_end)


def test_prompt_completion_without_a_template_is_prompt_completion_eos(tok):
    no_template = train_tokenizer(iter_texts(local(["tests/data/train.txt"])), 300)
    ids, mask, n_bytes = encode([("prompt", {"prompt": "The cat", "completion": " sat."}, "x:1")], no_template)[0]
    p, c = no_template("The cat")["input_ids"], no_template(" sat.", add_special_tokens=False)["input_ids"]
    assert ids == p + c + [no_template.eos_token_id] and mask == [0] * len(p) + [1] * (len(c) + 1)
    assert n_bytes == len(" sat.")
    # with a template, the pair is a user turn and an assistant turn: the loss is on the completion
    ids, mask, _ = encode([("prompt", {"prompt": "Hi", "completion": "Hello there."}, "x:1")], tok)[0]
    assert (ids, mask) == pieces_mask(tok, CONVERSATION[1:3], targets={1})


def test_too_long_samples_are_truncated_or_dropped_and_samples_without_targets_dropped(tmp_path, tok, capsys):
    long = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": CONVERSATION[1:3]}
    corpus = token_cache(local([lines(tmp_path, short, long, short)]), tok, str(tmp_path / "cache"))
    seqs = sequences(corpus, 0, 3, 40, packing=False)  # the long one, truncated, has no target left
    err = capsys.readouterr().err
    assert len(seqs) == 2 and "1 of 3 samples are longer than max_length=40 tokens and were truncated" in err
    assert "1 samples have no target tokens left" in err
    assert len(sequences(corpus, 0, 3, 50, packing=True, too_long="drop")) == 1  # both short ones in one block
    with pytest.raises(UserError, match="no training samples with target tokens remain"):
        sequences(corpus, 1, 2, 40, packing=False)


def tiny_model(vocab):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=256, vocab_size=vocab,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("files", [["tests/data/train.txt"], [CHAT]], ids=["text", "conversations"])
def test_a_packed_block_loss_is_the_sum_of_its_documents_losses(tmp_path, tok, files):
    corpus = token_cache(local(files), tok, str(tmp_path / "cache"))
    packed = sequences(corpus, 0, len(corpus.ends), 256, packing=True)
    model = tiny_model(len(tok))
    batch = gather(packed, range(4))
    assert all(packed.offsets[i + 1] - packed.offsets[i] > 1 for i in range(4))  # several documents a block
    with torch.no_grad():
        together = model(**collate(batch, 0), num_items_in_batch=torch.tensor(1), use_cache=False).loss
        alone = 0.0
        for a, b in packed.segments[packed.offsets[0]:packed.offsets[4]]:
            ids = torch.tensor(corpus.tokens[a:b].astype("int64"))[None]
            labels = ids.masked_fill(torch.tensor(corpus.mask[a:b] == 0)[None], -100)
            alone += model(ids, labels=labels, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=0)
    # without restarting positions (documents seeing each other) the same block fails that tolerance
    crossed = collate(batch, 0)
    crossed["position_ids"] = torch.arange(crossed["input_ids"].shape[1]).repeat(4, 1)
    with torch.no_grad():
        loss = model(**crossed, num_items_in_batch=torch.tensor(1), use_cache=False).loss
    assert not torch.allclose(loss, alone, rtol=1e-5, atol=0)


CHAT_RUN = ["--data", CHAT, "tests/data/train.txt", "--max-length", "128", "--config-overrides",
            "{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 128, resid_pdrop: 0, embd_pdrop: 0, attn_pdrop: 0}"]


def test_accumulation_is_exact_on_conversations(tmp_path):
    common = [*CHAT_RUN, "--max-steps", "1", "--grad-clip", "0", "--save-every", "1", "--packing"]
    train(tmp_path / "big", *common, "--batch-size", "8", "--grad-accum", "1")
    train(tmp_path / "acc", *common, "--batch-size", "2", "--grad-accum", "4")
    big = torch.load(tmp_path / "big/ckpt-step-1/training_state.pt", weights_only=True)["optimizer"]["state"]
    acc = torch.load(tmp_path / "acc/ckpt-step-1/training_state.pt", weights_only=True)["optimizer"]["state"]
    for k in big:
        torch.testing.assert_close(acc[k]["exp_avg"], big[k]["exp_avg"], rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model trained from scratch on conversations and text (ChatML tokenizer), with a checkpoint at 3."""
    out = tmp_path_factory.mktemp("chat") / "out"
    r = train(out, *CHAT_RUN, "--max-steps", "6", "--save-every", "3")
    assert "purpose: from scratch" in r.stderr
    return out


def test_resume_is_bit_identical_on_conversations(tmp_path, chat_model):
    train(tmp_path / "resumed", *CHAT_RUN, "--max-steps", "6", "--resume", chat_model / "ckpt-step-3")
    a = AutoModelForCausalLM.from_pretrained(chat_model).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_scores_only_the_answers_as_plain_transformers_does(tmp_path, chat_model):
    tok, model = AutoTokenizer.from_pretrained(chat_model), AutoModelForCausalLM.from_pretrained(chat_model).eval()
    assert tok.chat_template == CHATML  # saved with the model
    fits = [s for _, s, _ in read_samples(*local([CHAT]))
            if len(tok.apply_chat_template(s["messages"], return_dict=True)["input_ids"]) <= 128]  # the context
    r = run("EVAL.py", "--model", chat_model, "--data", lines(tmp_path, *fits), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    nll = n = 0
    for sample in fits:
        messages = sample["messages"]
        ids, mask = pieces_mask(tok, messages, {i for i, m in enumerate(messages) if m["role"] == "assistant"})
        assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        picked = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        nll -= float(picked[torch.tensor(mask[1:]) == 1].sum())
        n += sum(mask)
    got = dict(line.split() for line in r.stdout.splitlines())
    assert int(got["tokens"]) == n
    assert float(got["nll_per_token"]) == pytest.approx(nll / n, abs=2e-6)
    assert float(got["perplexity"]) == pytest.approx(math.exp(nll / n), abs=2e-4)


def test_infer_chat_renders_the_tokens_training_used(chat_model):
    import GENERATE
    tok = AutoTokenizer.from_pretrained(chat_model)
    conversation = CONVERSATION[:3]
    trained, _, _ = encode([("messages", {"messages": conversation}, "x:1")], tok)[0]
    g = types.SimpleNamespace(chat=True, system="Be brief.")
    asked = GENERATE.prompt_ids(tok, "Hi", g)
    assert trained[:len(asked)] == asked and tok.decode(trained[len(asked):]) == "Hello there.<|im_end|>\n"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    assert GENERATE.prompt_ids(tok, "Bye", g, history) == encode(
        [("messages", {"messages": CONVERSATION}, "x:1")], tok)[0][0][:len(GENERATE.prompt_ids(tok, "Bye", g, history))]
    r = run("INFER.py", "--model", chat_model, "--chat", "--prompt", "What is LLM-MINI?", "--greedy",
            "--max-new-tokens", "20")
    assert r.returncode == 0 and "<|im_end|>" not in r.stdout, r.stderr


def test_a_tokenizer_without_template_gets_chatml_ending_turns_with_a_stop_string():
    tok = train_tokenizer(iter_texts(local(["tests/data/train.txt"])), 300)  # no ChatML special tokens: <|im_end|> is plain text
    tok.chat_template = CHATML
    text, token = end_of_turn(tok)
    assert text == "<|im_end|>" and token is None  # several tokens: INFER.py stops on the string
