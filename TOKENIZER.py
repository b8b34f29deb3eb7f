"""Tokenizers: load a model's tokenizer (with a pad token), or train a byte-level BPE for a scratch model."""
import os
import sys

from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ATOMIC import replacing
from CHAT import CHATML, CHATML_TOKENS
from DATA import iter_texts
from MODEL import from_pretrained_args
from REPORT import UserError, first_line, log
from SOURCES import fingerprint

EOS = "<|endoftext|>"


def load_tokenizer(name, trust_remote_code=False):
    """The tokenizer of a model directory, .gguf file or hub id (its source checked already: MODEL.check_source)."""
    where, kw = from_pretrained_args(name)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{name}: could not load a tokenizer ({first_line(e, 200)}) - "
                        "pass --tokenizer DIR, or train from scratch so one is built")
    if tok.eos_token is None:
        raise UserError(f"{name}: the tokenizer has no EOS token - samples need one to end; pick another tokenizer")
    return with_pad(tok)


def with_pad(tok):
    # GPT-2 and LLaMA ship no pad token. Padding with EOS is safe: pads are told apart by their position, never by
    # comparing ids (BATCHES.collate gives them label -100 and positions of their own, so no real token attends to
    # them; generation passes an attention mask), so EOS stays a learned target.
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_tokenizer(texts, vocab_size, chat=False):
    """A GPT-2-style byte-level BPE trained on an iterator of texts, as a transformers tokenizer. chat: ChatML's
    role markers become special tokens (single ids, never split) and the tokenizer carries the ChatML template."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS] + (CHATML_TOKENS if chat else []), show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                  pad_token=EOS, model_max_length=sys.maxsize, clean_up_tokenization_spaces=False,
                                  **({"additional_special_tokens": CHATML_TOKENS} if chat else {}))
    if chat:
        tok.chat_template = CHATML
    return tok


def cached_bpe(sources, vocab_size, cache_dir, chat=False):
    """train_tokenizer on the data's sources (DATA.sources), saved under cache_dir and reused while they are
    unchanged."""
    path = os.path.join(cache_dir, f"bpe-{fingerprint(sources, 'bpe', vocab_size, chat)}")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        log(f"reusing the BPE tokenizer in {path}")
        return with_pad(AutoTokenizer.from_pretrained(path))
    log(f"training a byte-level BPE tokenizer ({vocab_size} tokens) on {', '.join(s.label() for s in sources)}")
    tok = train_tokenizer(iter_texts(sources), vocab_size, chat)
    with replacing(path) as tmp:
        tok.save_pretrained(tmp)
    return tok
