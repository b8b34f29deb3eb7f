"""Generation, shared by INFER.py (stdout), SERVE.py (HTTP) and GRPO.py: prompts to token ids (through the chat
template for a chat), transformers' model.generate with sampling and stop strings, streaming through its
streamer hook that never prints a stop string, and each answer's text cut at its end."""
import copy
import dataclasses
import itertools
import threading

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import DECODE
import PACK
from CHAT import end_of_turn
from DEVICE import native_bf16
from MODEL import context_length, load_for_use
from REPORT import UserError, log
from TOKENIZER import load_tokenizer


@dataclasses.dataclass(frozen=True)
class Options:
    """How one answer is generated."""
    max_new_tokens: int
    sampling: dict                 # generate()'s do_sample, temperature, top_k, top_p (sampling_of)
    stops: list                    # stop strings (a chat's end of turn where it is not one token)
    eos: list                      # token ids that end an answer: EOS, a chat's end-of-turn token


def load(mcfg, compiled):
    """The model and its tokenizer, loaded for generation (MODEL.load_for_use); on a CPU, unless the decoding step
    will be `compiled` (which multiplies plain weights), its linear layers packed for oneDNN (PACK.py; a LoRA
    adapter merged into them first)."""
    model = load_for_use(mcfg, "generate")
    if not compiled and PACK.packable(model, native_bf16(model.device)):
        model = PACK.to_packed(model.merge_and_unload() if hasattr(model, "merge_and_unload") else model)
    return model, load_tokenizer(mcfg.name, mcfg.trust_remote_code)


def for_batches(model):
    """The model that generates batches beside a `model` loaded for the compiled one-row step (which multiplies
    plain weights): on a CPU where packing pays, a twin whose linear layers are packed for oneDNN (PACK.py), every
    other tensor the model's own; else, and for a LoRA adapter (merging it would change the shared weights), the
    model itself."""
    if hasattr(model, "merge_and_unload") or not PACK.packable(model, native_bf16(model.device)):
        return model
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return PACK.to_packed(copy.deepcopy(model, shared), own=False)


def sampling_of(greedy, temperature, top_k, top_p):
    """generate()'s sampling arguments: greedy when asked or at temperature 0."""
    return dict(do_sample=False) if greedy or temperature == 0 else dict(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)


def stops_and_eos(tokenizer, stop, chat):
    """(stop strings, end token ids): EOS, and for a chat the template's end of turn (e.g. <|im_end|>), as a
    token where it is one, else as a stop string."""
    stops, eos = list(stop), [tokenizer.eos_token_id]
    if chat and tokenizer.chat_template:
        turn_end, turn_end_id = end_of_turn(tokenizer)
        eos += [turn_end_id] if turn_end_id is not None else []
        stops += [turn_end] if turn_end and turn_end_id is None else []
    return stops, eos


def chat_ids(tokenizer, messages):
    """A conversation -> the token ids of its chat-template rendering, ready for the assistant's answer."""
    if not tokenizer.chat_template:
        raise UserError("--chat: this model's tokenizer has no chat template - drop --chat, or use a chat model")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds BOS etc.


def prompt_ids(tokenizer, prompt, g, history=()):
    """Prompt text -> token ids, through the chat template (with g.system first) when g.chat (the infer section)."""
    if not g.chat:
        return tokenizer(prompt)["input_ids"]
    system = [{"role": "system", "content": g.system}] if g.system else []
    return chat_ids(tokenizer, system + list(history) + [{"role": "user", "content": prompt}])


def cut_at_stop(text, stops, prefix=""):
    """(text up to the first stop string, whether one was found). A stop string may begin in the prompt (its
    end, `prefix`) as long as it ends in the text, as transformers' StopStringCriteria matches them."""
    joined = prefix + text
    hits = [i for i in (joined.find(s, max(0, len(prefix) - len(s) + 1)) for s in stops) if i >= 0]
    return (text[:max(0, min(hits) - len(prefix))], True) if hits else (text, False)


def held_back(text, stops):
    """How many trailing characters could be the start of a stop string, so must not be printed yet."""
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


def prompt_end(tokenizer, ids, stops):
    """The prompt's last characters, where a stop string could begin (see cut_at_stop)."""
    return tokenizer.decode(ids, skip_special_tokens=True)[-max(map(len, stops), default=0):] if stops else ""


def fit_context(ids, max_new_tokens, context, warned):
    """Keep the tail of a prompt that leaves no room for max_new_tokens in the context window."""
    max_new_tokens = min(max_new_tokens, context - 1)
    room = context - max_new_tokens
    if len(ids) > room and not warned:
        log(f"warning: a prompt of {len(ids)} tokens is too long; keeping its last {room} so that "
            f"{max_new_tokens} new tokens fit the model's context of {context}")
        warned.append(True)
    return ids[-room:], max_new_tokens


@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt to answer: its token ids and Options, where its text goes as it comes (a writer, or None), and
    whether its asker went away (`cancel`, set by another thread)."""
    prompt_ids: list
    opts: Options
    sink: object = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class Answer:
    """A row's answer as it grows during generate()."""
    prefix: str = ""                  # the prompt's end, where a stop string could begin (prompt_end)
    new_ids: list = dataclasses.field(default_factory=list)   # every token generated, end token included
    text: str = ""                    # the answer: up to its end token or stop string
    n_tokens: int = 0                 # the answer's tokens (its end token not counted)
    ended: bool = False               # at an end token or stop string (else: max_new_tokens, or cancelled)
    done: bool = False
    shown: int = 0                    # characters of text written to the row's sink


def advance(tokenizer, row, answer, new_ids, final=False):
    """A row's answer after the tokens new_ids: its text, whether it is done (or `final`), and the new text that
    can be shown, written to the row's sink (never a stop string or its beginning, nor a character whose bytes
    are still coming)."""
    ends = [new_ids.index(e) for e in row.opts.eos if e in new_ids]
    ids = new_ids[:min(ends, default=len(new_ids))]
    answer.new_ids = new_ids[:len(ids) + 1] if ends else new_ids
    answer.text, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), row.opts.stops, answer.prefix)
    answer.n_tokens, answer.ended = len(ids), bool(ends) or stopped
    answer.done = final or answer.ended or len(new_ids) >= row.opts.max_new_tokens or row.cancel.is_set()
    text = answer.text
    shown = text if answer.done else text[:len(text) - held_back(text, row.opts.stops)].rstrip("\ufffd")
    if row.sink is not None and len(shown) > answer.shown:
        row.sink.write(shown[answer.shown:])
        row.sink.flush()
        answer.shown = len(shown)


class Stream(BaseStreamer):
    """transformers' streamer hook: after every step, model.generate puts each row's new token here; each row's
    answer advances (its text goes to its sink as it comes) until the row is done."""

    def __init__(self, tokenizer, rows, answers):
        self.tokenizer, self.rows, self.answers, self.prompt_seen = tokenizer, rows, answers, False

    def put(self, value):  # first the prompts (B, T), then each step's new tokens (B,)
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, answer, token in zip(self.rows, self.answers, value.tolist()):
            if not answer.done:
                advance(self.tokenizer, row, answer, answer.new_ids + [token])

    def end(self):
        pass


class Done(StoppingCriteria):
    """Tells model.generate which rows are done (their answers say so: Stream keeps them current)."""

    def __init__(self, answers):
        self.answers = answers

    def __call__(self, input_ids, scores, **kw):
        return torch.tensor([answer.done for answer in self.answers], device=input_ids.device)


def generate(model, tokenizer, rows, compiled=None):
    """Answer rows together in one model.generate call, left-padded (each row ends where its answer starts). One
    call samples every row alike and stops at one set of end tokens, so the rows must share Options.sampling
    and .eos (SCHEDULER.together groups requests so); max_new_tokens, stop strings, streaming and cancellation
    are each row's own. `compiled` (DECODE.compiled_step, or None): a single row decodes with the compiled step
    and a static cache. -> [Answer] in the rows' order."""
    first = rows[0].opts
    if any(row.opts.sampling != first.sampling or row.opts.eos != first.eos for row in rows):
        raise ValueError("rows of one generate call must share their sampling and end tokens")
    width = max(len(row.prompt_ids) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.prompt_ids):], mask[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids), 1
    answers = [Answer(prefix=prompt_end(tokenizer, row.prompt_ids, row.opts.stops)) for row in rows]
    max_new_tokens = max(row.opts.max_new_tokens for row in rows)
    fast = dict(compile_config=compiled, cache=DECODE.static_cache(model, width + max_new_tokens, context_of(model))
                ) if compiled is not None and len(rows) == 1 else {}
    with torch.inference_mode():
        out = model.generate(input_ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, eos_token_id=first.eos,
                             pad_token_id=tokenizer.pad_token_id, **first.sampling, **fast,
                             streamer=Stream(tokenizer, rows, answers), stopping_criteria=StoppingCriteriaList([Done(answers)]))
    for i, (row, answer) in enumerate(zip(rows, answers)):  # one that generate cut short (its last token unseen)
        if not answer.done:
            advance(tokenizer, row, answer, out[i, width:].tolist()[:row.opts.max_new_tokens], final=True)
    return answers


def context_of(model):
    """The tokens the model sees at once: prompt and answer must fit."""
    return context_length(model.config)
