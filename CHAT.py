"""Conversations and instructions: what a .jsonl line holds, the chat template, and the tokens a sample
becomes with the mask of those that are trained on (targets).

    {"text": "..."}                                                 plain text: every token is a target
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   a conversation
    {"prompt": "...", "completion": "..."}                          an instruction and its answer
    {"instruction": "...", "input": "...", "output": "..."}         Alpaca: read as prompt/completion
    {"prompt": [messages], "completion": [messages]}                TRL's conversational prompt/completion:
                                                                    trained on the completion's turns
    {"prompt": ..., "chosen": ..., "rejected": ...}                 a preference pair (DPO, PREFERENCE.py):
        strings, or lists of messages; or chosen and rejected as whole conversations sharing their first turns
    {"prompt": ...} (no completion)                                 a prompt alone, a string or messages (GRPO.py)

Conversations are rendered with the tokenizer's own chat template (INFER.py --chat renders the same
tokens). The assistant's spans are found by rendering growing prefixes of the conversation and comparing
them with the whole (as torchtune and axolotl do), so any template works, with or without
{% generation %} markers. A tokenizer without a template gets CHATML below.
"""
from REPORT import UserError, first_line, log

ROLES = ("system", "user", "assistant")
# loss_on when data.loss_on is not set: it follows the data
DEFAULT_LOSS_ON = {"text": "all", "messages": "assistant", "prompt": "completion", "preference": "completion",
                   "prompt_only": "completion"}
# ChatML, as TRL's setup_chat_format writes it; a scratch tokenizer gets its markers as special tokens
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def parse(obj, where):
    """One .jsonl object -> (kind, sample): kind is text, messages, prompt, preference or prompt_only. Raises
    UserError naming `where`."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object like {{\"text\": \"…\"}}, got a {type(obj).__name__}")
    if "messages" in obj:
        null(obj, "messages", where)
        return "messages", {"messages": check_messages(obj["messages"], where)}
    if "chosen" in obj or "rejected" in obj:
        return "preference", preference(obj, where)
    if "prompt" in obj and "completion" not in obj:  # a prompt alone: what GRPO samples completions for
        prompt = turns(obj, "prompt", where) if isinstance(obj["prompt"], list) else string(obj, "prompt", where)
        return "prompt_only", {"prompt": prompt}
    if isinstance(obj.get("prompt"), list):  # TRL's conversational form: a conversation, trained after the prompt
        prompt, completion = turns(obj, "prompt", where), turns(obj, "completion", where)
        return "messages", {"messages": check_messages(prompt + completion, where), "prompt_turns": len(prompt)}
    if "prompt" in obj or "completion" in obj:
        return "prompt", {"prompt": string(obj, "prompt", where), "completion": string(obj, "completion", where)}
    if "instruction" in obj or "output" in obj:
        instruction, extra = string(obj, "instruction", where), obj.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: \"input\" is a {type(extra).__name__} - it must be a string")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return "prompt", {"prompt": prompt, "completion": string(obj, "output", where)}
    if "text" not in obj:
        raise UserError(f"{where}: no \"text\" field (nor \"messages\", \"prompt\"/\"completion\" or "
                        "\"instruction\"/\"output\") - each object needs one of these")
    return "text", {"text": string(obj, "text", where)}


def string(obj, key, where):
    if not isinstance(obj.get(key), str):
        null(obj, key, where)
        what = f"no \"{key}\" field" if key not in obj else f"\"{key}\" is a {type(obj[key]).__name__}"
        raise UserError(f"{where}: {what} - it must be a string")
    return obj[key]


def null(obj, key, where):
    """A column's missing value (Parquet, CSV, datasets: None) is its own mistake, whatever the field's type."""
    if key in obj and obj[key] is None:
        raise UserError(f"{where}: \"{key}\" is null - drop or fill it")


def preference(obj, where):
    """A preference pair: {"prompt", "chosen", "rejected"} of strings or of message lists, or (implicit) chosen
    and rejected as whole conversations whose shared first turns are the prompt."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise UserError(f"{where}: no \"{key}\" field - a preference pair needs \"prompt\", \"chosen\" and "
                            "\"rejected\" (or chosen and rejected as whole conversations)")
    if isinstance(obj.get("prompt"), str):
        prompt, chosen, rejected = (string(obj, key, where) for key in ("prompt", "chosen", "rejected"))
    elif "prompt" in obj:
        prompt, chosen, rejected = (turns(obj, key, where) for key in ("prompt", "chosen", "rejected"))
    else:
        chosen, rejected = turns(obj, "chosen", where), turns(obj, "rejected", where)
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        raise UserError(f"{where}: the prompt has no turns - give a \"prompt\", or chosen and rejected "
                        "conversations that begin with the same messages")
    if chosen == rejected:
        raise UserError(f"{where}: \"chosen\" and \"rejected\" are the same - a pair must prefer one answer to another")
    answers = chosen + rejected if isinstance(chosen, list) else []
    if not chosen or not rejected or any(m["role"] != "assistant" for m in answers):
        raise UserError(f"{where}: the chosen and rejected answers must be assistant messages after the prompt")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def turns(obj, key, where):
    """obj[key] as a checked, non-empty list of messages."""
    value = obj.get(key)
    null(obj, key, where)
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: \"{key}\" must be a string or a non-empty list of {{\"role\": …, \"content\": …}}"
                        " objects")
    return check_messages(value, where, key=key, need_assistant=False)


def check_messages(messages, where, key="messages", need_assistant=True):
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: \"{key}\" must be a non-empty list of {{\"role\": …, \"content\": …}} objects")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} has no string \"content\"")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} has role {m.get('role')!r} - use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})  # other keys are ignored
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant message - there is nothing to train on")
    return out


def texts_of(sample):
    """The plain strings of a sample (to train a tokenizer on)."""
    return [text for v in sample.values() if isinstance(v, (str, list))
            for text in ([v] if isinstance(v, str) else [m["content"] for m in v])]


def with_template(tokenizer):
    """Give a tokenizer without a chat template the default one, saying so (saved with it, so INFER.py --chat and
    plain apply_chat_template render conversations as training did)."""
    if not tokenizer.chat_template:
        log("the tokenizer has no chat template: conversations are rendered with the default ChatML one "
            "(docs/data.md); a model trained on them keeps it for INFER.py --chat")
        tokenizer.chat_template = CHATML
    return tokenizer


def template(tokenizer, messages, where, generation_prompt=False):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's own errors, or raise_exception() inside the template
        raise UserError(f"{where}: the chat template refused this conversation ({first_line(e, 120)})")


def assistant_spans(tokenizer, messages, where, last_only, first=0):
    """The rendered conversation and the character ranges of its assistant turns (from message `first` on):
    each from where the generation prompt ends to the end of the turn's rendering, end-of-turn marker included
    (trailing whitespace after it is not a target)."""
    full = template(tokenizer, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        before = template(tokenizer, messages[:i], where, generation_prompt=True)
        through = template(tokenizer, messages[:i + 1], where).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise UserError(f"{where}: the chat template renders message {i + 1} differently as the end of a "
                            "conversation than inside it, so its tokens cannot be found - use data.loss_on all")
        spans.append((len(before), len(through)))
    return full, spans[-1:] if last_only else spans


def pieces(sample, kind, tokenizer, loss_on, where):
    """A sample as the texts to tokenize, in order, and which of their characters are targets:
    ([(text, add_special_tokens, targets)], EOS follows as a target). targets: True (all), False (none) or
    a list of character ranges."""
    if kind == "text":
        return [(sample["text"], True, True)], True
    if kind == "prompt" and not tokenizer.chat_template:  # prompt + completion + EOS, tokenized apart as TRL does
        return [(sample["prompt"], True, loss_on == "all"), (sample["completion"], False, True)], True
    messages = sample.get("messages") or [{"role": "user", "content": sample["prompt"]},
                                          {"role": "assistant", "content": sample["completion"]}]
    if loss_on == "all":
        return [(template(tokenizer, messages, where), False, True)], False
    full, spans = assistant_spans(tokenizer, messages, where, last_only=loss_on == "last_assistant",
                                  first=sample.get("prompt_turns", 0))
    return [(full, False, spans)], False


def answers(sample):
    """A preference pair as the two samples it trains on, chosen then rejected: (kind, sample) each."""
    prompt = sample["prompt"]
    if isinstance(prompt, str):
        return [("prompt", {"prompt": prompt, "completion": sample[k]}) for k in ("chosen", "rejected")]
    return [("messages", {"messages": prompt + sample[k], "prompt_turns": len(prompt)}) for k in ("chosen", "rejected")]


def encode(samples, tokenizer, loss_on=None):
    """[(ids, mask, target bytes)] for [(kind, sample, where)] (a preference pair gives two: chosen, then
    rejected): mask[i] = 1 where token i is a target (the
    first token of a sample, having nothing before it, never is); target bytes count the UTF-8 bytes of the
    target characters, for bits per byte. Texts are tokenized in a few batched calls (all cores)."""
    samples = [(k, s, where) for kind, sample, where in samples
               for k, s in (answers(sample) if kind == "preference" else [(kind, sample)])]  # a pair: two documents
    planned = [pieces(s, kind, tokenizer, loss_on or DEFAULT_LOSS_ON[kind], where) for kind, s, where in samples]
    flat = [p for parts, _ in planned for p in parts]
    encoded = [None] * len(flat)
    for special, ranges in ((True, False), (False, False), (False, True)):
        todo = [i for i, (_, s, t) in enumerate(flat) if s == special and isinstance(t, list) == ranges]
        for i, got in zip(todo, tokenize([flat[i][0] for i in todo], tokenizer, special, ranges) if todo else []):
            encoded[i] = got
    result, k, eos = [], 0, tokenizer.eos_token_id
    for parts, add_eos in planned:
        ids, mask, n_bytes = [], [], 0
        for text, _, targets in parts:
            part_ids, offsets = encoded[k]
            k += 1
            if isinstance(targets, list):
                part_mask = [int(any(a <= start < b for a, b in targets)) for start, _ in offsets]
                n_bytes += sum(len(text[a:b].encode("utf-8")) for a, b in targets)
            else:
                part_mask = [int(targets)] * len(part_ids)
                n_bytes += len(text.encode("utf-8")) if targets else 0
            ids, mask = (ids + part_ids, mask + part_mask) if ids else (part_ids, part_mask)  # one part: no copy
        if add_eos and (not ids or ids[-1] != eos):
            ids.append(eos)  # ids and mask are this document's own lists
            mask.append(1)
        mask[0] = 0
        result.append((ids, mask, n_bytes))
    return result


def tokenize(texts, tokenizer, special, offsets):
    """[(ids, character offsets or None)] of texts, encoded together by the `tokenizers` library (all cores):
    what tokenizer(texts) returns, without transformers' conversion of each text (a third of the time). Through
    transformers where that differs: a slow tokenizer, or truncation or padding set in the tokenizer's file."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation or backend.padding or \
            backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        out = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=offsets)
        return [(ids, out["offset_mapping"][n] if offsets else None) for n, ids in enumerate(out["input_ids"])]
    return [(e.ids, e.offsets if offsets else None) for e in backend.encode_batch(texts, add_special_tokens=special)]


def end_of_turn(tokenizer):
    """What ends an assistant turn in this tokenizer's template, e.g. '<|im_end|>': (text, token id or None when
    it is several tokens), or (None, None) when the template ends turns with nothing but whitespace."""
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    before = tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
    through = tokenizer.apply_chat_template(probe, tokenize=False).rstrip()
    tail = through[len(before) + 1:] if through.startswith(before + "2") else ""
    if not tail:
        return None, None
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return tail, ids[0] if len(ids) == 1 else None
