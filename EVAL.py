"""Measure a model on text: perplexity, NLL per token, bits per byte; per-token dumps; the training plot;
and validate(), the exact validation loss TRAIN.py logs during training.

    python EVAL.py --model out --data data/train.txt               # perplexity over the whole data
    python EVAL.py --model out --data long.txt --window 512 --stride 256   # sliding window for long texts
    python EVAL.py --model out --data a.jsonl --dump tokens.jsonl --dump-top-k 5
    python EVAL.py --plot out                                      # out/loss.png from out/metrics.jsonl

Each sample is scored as TRAIN.py trains it, with the same tokens and targets: plain text is its tokens
plus EOS, every token but the first scored exactly once; a conversation scores only its assistant turns
(data.loss_on). Perplexity is exp(sum of NLL / number of scored tokens) over all the data, not a mean of
batch means; bits per byte divide by the UTF-8 bytes of the scored text.
"""
import dataclasses
import itertools
import json
import math
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import BENCHMARKS
import CONFIG
import FLAGS
import METRICS
import REPORT
import SETTINGS
from BATCHES import collate, count_targets, gather
from CHAT import encode, with_template
from DATA import check_loss_on, kinds, read_all, sources
from MODEL import context_length, load_for_use, no_padding_warning
from REPORT import UserError
from TOKENIZER import load_tokenizer


def windows(n, window, stride):
    """Sliding windows over a document of n tokens, as the Hugging Face perplexity guide does it:
    [(begin, end, n_scored)]: score the last n_scored tokens of ids[begin:end]; each token once."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def score(model, batch):
    """Log-probabilities of the target tokens of [(ids, labels, position ids)]: [(target ids, logprob rows)]."""
    b = collate(batch, 0)
    with torch.inference_mode():
        logits = model(input_ids=b["input_ids"].to(model.device), position_ids=b["position_ids"].to(model.device),
                       use_cache=False).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).cpu()  # (B, T-1, V): position t predicts token t+1
    labels = b["labels"][:, 1:]
    return [(labels[row][labels[row] != -100], logprobs[row][labels[row] != -100]) for row in range(len(batch))]


def evaluate(model, tokenizer, samples, e, loss_on=None, on_document=None):
    """Sum of NLL, scored tokens and target UTF-8 bytes over [(kind, sample, where)], in windows of e.window
    tokens every e.stride (the eval section, both set): each sample is encoded as training encodes it
    (CHAT.encode: the same tokens and target mask); memory is bounded by one batch of windows and a chunk of
    samples. on_document(doc, parts) sees each document's scored tokens (dumper)."""
    nll, tokens, n_bytes, pending, doc = 0.0, 0, 0, [], 0  # pending: (doc index, (ids, labels, positions))

    def flush():
        nonlocal nll, tokens
        doc_parts = {}
        for (d, _), (targets, lp) in zip(pending, score(model, [p[1] for p in pending])):
            picked = lp.gather(1, targets[:, None])[:, 0]
            nll -= float(picked.double().sum())
            tokens += len(targets)
            if on_document:
                doc_parts.setdefault(d, []).append((targets, lp, picked))
        if on_document:
            for d, parts in doc_parts.items():
                on_document(d, parts)
        pending.clear()

    samples = iter(samples)
    while chunk := list(itertools.islice(samples, 256)):
        for ids, mask, target_bytes in encode(chunk, tokenizer, loss_on):
            n_bytes += target_bytes
            for begin, end, n_scored in windows(len(ids), e.window, e.stride):
                labels = [t if m and i >= end - n_scored else -100
                          for i, t, m in zip(range(begin, end), ids[begin:end], mask[begin:end])]
                pending.append((doc, (ids[begin:end], [-100] + labels[1:], range(end - begin))))
                if len(pending) == e.batch_size:
                    flush()
            doc += 1
    if pending:
        flush()
    return nll, tokens, n_bytes


def validate(scorer, seqs, indices, run, batch_size, pad_id):
    """Validation loss exp-able to perplexity: Σ NLL / Σ target tokens over the sequences `indices` of seqs
    (not a mean of batch means), in float64, in the run's precision, through the training run's LOSS.Scorer.
    Ranks score disjoint batches and sum; every rank runs the same number of forward passes (FSDP gathers
    parameters in each), an empty share scoring a dummy with weight 0."""
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # (Σ NLL, Σ targets)
    scorer.eval()
    with torch.no_grad():
        for start in range(0, len(indices), batch_size * run.world):
            mine = indices[start + run.rank * batch_size:start + (run.rank + 1) * batch_size]
            batch = collate(gather(seqs, mine or indices[:1]), pad_id)
            n = count_targets(batch) if mine else 0
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with run.autocast:
                nll = scorer(batch["input_ids"], batch["position_ids"], batch["labels"])
            sums += torch.stack([nll.double() * bool(mine), torch.tensor(n, dtype=torch.float64, device=run.device)])
    scorer.train()
    if run.world > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


SAMPLES, SAMPLE_TOKENS = 3, 32  # each validation's samples for the trackers: a few, short


def samples(model, tokenizer, seqs, indices, run):
    """The beginnings of the first SAMPLES validation sequences `indices` of seqs, what the data says next and
    the model's greedy continuation (SAMPLE_TOKENS each): [{"prompt", "data", "model"}], for the trackers. A
    conversation's prompt is everything before its first scored (assistant) token; plain text's, its first half
    (at most SAMPLE_TOKENS). Greedy, in eval mode: no random number is drawn, so training goes on exactly as
    without it. One process alone: not for FSDP's sharded weights."""
    rows = []
    model.eval()
    for ids, labels, positions in gather(seqs, indices[:SAMPLES]):
        n = next((i for i in range(1, len(ids)) if positions[i] == 0), len(ids))  # its first document (packing)
        first = next(i for i in range(n) if labels[i] != -100)
        cut = first if first > 1 else max(1, min(n // 2, SAMPLE_TOKENS))
        prompt = torch.as_tensor(ids[None, :cut], device=run.device)  # (1, cut)
        with torch.no_grad(), run.autocast:
            new = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=SAMPLE_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, cut:]
        rows.append({"prompt": tokenizer.decode(ids[:cut]), "model": tokenizer.decode(new, skip_special_tokens=True),
                     "data": tokenizer.decode(ids[cut:cut + SAMPLE_TOKENS], skip_special_tokens=True)})
    model.train()
    return rows


def dumper(path, top_k):
    """A per-document callback writing token ids and log-probabilities (JSONL streams; .npy is kept in memory)."""
    if path.endswith(".npy"):
        chunks = []
        return (lambda doc, parts: chunks.extend(p[2].numpy() for p in parts)), (
            lambda: np.save(path, np.concatenate(chunks).astype("float32") if chunks else np.zeros(0, "float32")))
    if not path.endswith(".jsonl"):
        raise UserError(f"eval.dump: {path} - use a .jsonl or .npy file name")
    fh = open(path, "w")
    last = {}

    def write(doc, parts):
        rec = last.get(doc) or {"doc": doc, "tokens": [], "logprobs": [], **({"top_k": []} if top_k else {})}
        for targets, lp, picked in parts:
            rec["tokens"] += targets.tolist()
            rec["logprobs"] += [round(x, 6) for x in picked.tolist()]
            if top_k:
                vals, idx = lp.topk(top_k, dim=-1)
                rec["top_k"] += [[[i, round(v, 6)] for i, v in zip(ii, vv)] for ii, vv in zip(idx.tolist(), vals.tolist())]
        for d in [d for d in last if d != doc]:  # documents arrive in order: earlier ones are complete
            fh.write(json.dumps(last.pop(d)) + "\n")
        last[doc] = rec

    def close():
        for rec in last.values():
            fh.write(json.dumps(rec) + "\n")
        fh.close()
    return write, close


def score_tasks(model, tokenizer, t, run):
    """training.eval_tasks on the current weights, on rank 0 (the others wait): ({"task/metric": score}, seconds)."""
    t0, found = time.perf_counter(), {}
    if run.master:
        training = model.training  # lm-eval's HFLM puts the model in eval mode; the loop's mode comes back after
        tasks = [name for item in t.eval_tasks for name in item.split(",") if name]
        found = BENCHMARKS.scores(BENCHMARKS.evaluate(model, tokenizer, tasks, include_path=t.eval_tasks_path,
                                                      limit=t.eval_tasks_limit, batch_size=t.batch_size))
        model.train(training)
    if run.world > 1:
        dist.barrier()
    return found, time.perf_counter() - t0


def benchmark(mcfg, e):
    """EVAL.py --tasks: lm-eval's evaluator on the model; its table on stdout, the full JSON beside the model."""
    model = load_for_use(mcfg, "score")
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter: lm-eval takes one plain model
        model = model.merge_and_unload()
    tasks = [t for item in e.tasks for t in item.split(",") if t]
    results = BENCHMARKS.evaluate(model, load_tokenizer(mcfg.name, mcfg.trust_remote_code), tasks,
                                  num_fewshot=e.num_fewshot, limit=e.limit, include_path=e.include_path,
                                  batch_size=e.batch_size)
    print(BENCHMARKS.write(results, BENCHMARKS.results_path(mcfg.name)))
    return 0


def main(argv):
    plotting = any(a.split("=")[0] == "--plot" for a in argv)  # --plot OUT needs no model and no data
    scoring = any(a.split("=")[0] == "--tasks" for a in argv)  # --tasks: their data is the tasks'
    cfg, resolved = SETTINGS.load(argv, CONFIG.EVAL_SECTIONS, description=__doc__, config_default=None,
                                required=() if plotting else ("model.name",) + (() if scoring else ("data.files",)),
                                usage="python EVAL.py --model out --data data/train.txt")
    if resolved.print_only:
        return FLAGS.print_config(cfg, resolved)
    e = cfg.eval
    if e.plot:
        print(f"wrote {METRICS.plot_metrics(e.plot)}", file=sys.stderr)
        return
    if e.tasks:
        return benchmark(cfg.model, e)
    data, _ = sources(cfg.data)
    found = kinds(data)
    check_loss_on(found, cfg.data.loss_on)
    alone = next((name for name, kind in found.items() if kind == "prompt_only"), None)
    if alone:
        raise UserError(f"{alone}: holds prompts alone - there is no answer to score; give completions, "
                        "conversations or text")
    chat = "messages" in found.values()
    no_padding_warning()
    model = load_for_use(cfg.model, "score")
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    if chat:
        with_template(tokenizer)
    context = context_length(model.config)
    if (e.window or 0) > context:
        raise UserError(f"eval.window: {e.window} is above the model's context of {context}")
    e = dataclasses.replace(e, window=e.window or context)
    if (e.stride or 0) > e.window:
        raise UserError(f"eval.stride: {e.stride} is above the window of {e.window} tokens - tokens would go unscored")
    e = dataclasses.replace(e, stride=e.stride or e.window)
    on_doc, close = dumper(e.dump, e.dump_top_k) if e.dump else (None, None)
    nll, tokens, n_bytes = evaluate(model, tokenizer, read_all(data), e, cfg.data.loss_on, on_doc)
    if close:
        close()
    print(f"perplexity     {math.exp(nll / tokens):.4f}")
    print(f"nll_per_token  {nll / tokens:.6f}")
    print(f"bits_per_byte  {nll / math.log(2) / n_bytes:.6f}")
    print(f"tokens         {tokens}")
    print(f"bytes          {n_bytes}")


if __name__ == "__main__":
    REPORT.main_guard(main)
