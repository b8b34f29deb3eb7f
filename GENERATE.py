"""Generation, shared by INFER.py (stdout) and SERVE.py (HTTP): prompts to token ids (through the chat template
for a chat), transformers' model.generate with sampling and stop strings, streaming that never prints a stop
string, and the answer's text cut at its end."""
import dataclasses

import torch
from transformers import TextStreamer

from CHAT import end_of_turn
from CONFIG import UserError, log
from MODEL import context_length, load_for_use
from TOKENIZER import load_tokenizer


@dataclasses.dataclass(frozen=True)
class Options:
    """How one answer is generated."""
    max_new_tokens: int
    sampling: dict                 # generate()'s do_sample, temperature, top_k, top_p (sampling_of)
    stops: list                    # stop strings (a chat's end of turn where it is not one token)
    eos: list                      # token ids that end an answer: EOS, a chat's end-of-turn token


def load(mcfg):
    """The model and its tokenizer, loaded for generation (MODEL.load_for_use)."""
    return load_for_use(mcfg, "generate"), load_tokenizer(mcfg.name, mcfg.trust_remote_code)


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
    """(text up to the first stop string, whether one was found). transformers' StopStringCriteria also
    matches a stop string that begins in the prompt, so `prefix` (the prompt's end) is searched too."""
    joined = prefix + text
    hits = [joined.find(s) for s in stops if s in joined]
    return (text[:max(0, min(hits) - len(prefix))], True) if hits else (text, False)


def held_back(text, stops):
    """How many trailing characters could be the start of a stop string, so must not be printed yet."""
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


def prompt_end(tokenizer, ids, stops):
    """The prompt's last characters, where a stop string could begin (see cut_at_stop)."""
    return tokenizer.decode(ids, skip_special_tokens=True)[-max(map(len, stops), default=0):] if stops else ""


class StopStreamer(TextStreamer):
    """transformers' TextStreamer, writing to `out` and never writing a stop string (or its beginning); `after`
    each answer. `prefix`: the prompt's end (prompt_end); `final`: what was shown of the last answer."""

    def __init__(self, tokenizer, stops, out, after="\n"):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stops, self.out, self.after = stops, out, after
        self.text, self.printed, self.final, self.prefix = "", 0, "", ""

    def on_finalized_text(self, new, stream_end=False):
        self.text += new
        shown, stopped = cut_at_stop(self.text, self.stops, self.prefix)
        if not (stopped or stream_end):
            shown = shown[:len(shown) - held_back(shown, self.stops)]
        if len(shown) > self.printed:
            self.out.write(shown[self.printed:])
            self.printed = len(shown)
        if stream_end:  # ready for the next prompt
            self.out.write(self.after)
            self.text, self.printed, self.final = "", 0, shown
        self.out.flush()


def fit_context(ids, max_new_tokens, context, warned):
    """Keep the tail of a prompt that leaves no room for max_new_tokens in the context window."""
    max_new_tokens = min(max_new_tokens, context - 1)
    room = context - max_new_tokens
    if len(ids) > room and not warned:
        log(f"warning: a prompt of {len(ids)} tokens is too long; keeping its last {room} so that "
            f"{max_new_tokens} new tokens fit the model's context of {context}")
        warned.append(True)
    return ids[-room:], max_new_tokens


def generate(model, tokenizer, batch_ids, opts, **kw):
    """Token-id lists -> new token ids per prompt (rows left-padded: each ends where generation starts), with
    opts (Options). kw: a streamer, stopping_criteria."""
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids):], mask[row, width - len(ids):] = torch.tensor(ids), 1
    extra = dict(stop_strings=opts.stops, tokenizer=tokenizer) if opts.stops else {}
    with torch.inference_mode():
        out = model.generate(input_ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=opts.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=opts.eos, **opts.sampling, **extra, **kw)
    return out[:, width:].tolist()


def completion(tokenizer, prompt_ids, new_ids, opts):
    """New token ids -> (the answer's text, its token count, whether it ended at an end token or stop string)."""
    ends = [new_ids.index(e) for e in opts.eos if e in new_ids]
    ids = new_ids[:min(ends, default=len(new_ids))]
    text, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), opts.stops,
                                prompt_end(tokenizer, prompt_ids, opts.stops))
    return text, len(ids), bool(ends) or stopped


def context_of(model):
    """The tokens the model sees at once: prompt and answer must fit."""
    return context_length(model.config)
