"""How the server answers many clients at once: requests wait in one queue, and one worker (the server's main
thread, the only one that touches the model) takes those that can generate together into a single
GENERATE.generate call.

Together means: the same sampling settings and end tokens, up to --batch-size rows, prompt and answer within
the context; a sampled request with a seed runs alone, so its answer is the one that seed gives. A greedy
answer is the same text alone or in a batch. A full queue refuses new requests (the server answers 503 with
Retry-After); a client that goes away leaves the queue at once, or stops its row at the next token.
Log-probabilities are EVAL.py's (EVAL.score: the same forward pass over the same tokens).
"""
import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Optional

import torch

import GENERATE
from EVAL import score
from REPORT import log


@dataclasses.dataclass(eq=False)  # compared by identity: the queue removes this job, not an equal one
class Job:
    """One prompt of a request: its Row, its seed, and what log-probabilities it wants (top: how many
    alternatives per token, None for none; echo: the prompt's too). `future` receives the Job with its answer."""
    row: GENERATE.Row
    seed: Optional[int] = None
    top: Optional[int] = None
    echo: bool = False
    answer: GENERATE.Answer = dataclasses.field(default_factory=GENERATE.Answer)
    logprobs: list = dataclasses.field(default_factory=list)  # [(token id, logprob or None, [(id, logprob)] or None)]
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


# A batch's clients usually ask again as soon as they have their answers; the worker waits this long at most for
# as many requests as its last batch held, so that batches stay full instead of alternating small and large.
GATHER_SECONDS = 0.02


@dataclasses.dataclass
class Waiting:
    """The queue: jobs in arrival order, the condition the worker waits on, its limits, the last batch's size, and
    what it has handed out: jobs, batches, the largest batch (the server's log says so as it stops)."""
    max_batch: int
    max_waiting: int
    context: int
    jobs: collections.deque = dataclasses.field(default_factory=collections.deque)
    ready: threading.Condition = dataclasses.field(default_factory=threading.Condition)
    last: int = 1
    taken: int = 0
    batches: int = 0
    largest: int = 0


def submit(waiting, jobs):
    """Queue a request's jobs, all or none. -> False when that would pass max_waiting."""
    with waiting.ready:
        if len(waiting.jobs) + len(jobs) > waiting.max_waiting:
            return False
        waiting.jobs.extend(jobs)
        waiting.ready.notify()
    return True


def withdraw(waiting, jobs):
    """A client went away: its jobs leave the queue now, and those already generating stop at the next token."""
    with waiting.ready:
        for job in jobs:
            job.row.cancel.set()
            if job in waiting.jobs:
                waiting.jobs.remove(job)


def together(job):
    """What must be equal for jobs to share one generate call: the sampling and end tokens (GENERATE.generate
    applies one of each to all its rows), and a seed only ever to one job."""
    opts = job.row.opts
    alone = id(job) if job.seed is not None and opts.sampling.get("do_sample") else None
    return tuple(sorted(opts.sampling.items())), tuple(opts.eos), alone


def take(waiting):
    """Wait for the oldest job (and a moment for the last batch's clients), then take every later one that can
    generate with it, up to max_batch."""
    with waiting.ready:
        while not waiting.jobs:  # woken by submit(), and each second: a signal (Ctrl-C) may reach any thread of
            waiting.ready.wait(1)  # the process, and Python raises it only on this one, once it runs again
        deadline = time.monotonic() + GATHER_SECONDS
        while len(waiting.jobs) < min(waiting.last, waiting.max_batch) and time.monotonic() < deadline:
            waiting.ready.wait(deadline - time.monotonic())
        batch = [waiting.jobs.popleft()]
        key = together(batch[0])
        for job in list(waiting.jobs):
            if len(batch) == waiting.max_batch or batch[0].row.opts.max_new_tokens == 0:
                break
            width = max(len(j.row.prompt_ids) for j in batch + [job])
            if together(job) == key and job.row.opts.max_new_tokens and width + max(
                    j.row.opts.max_new_tokens for j in batch + [job]) <= waiting.context:
                waiting.jobs.remove(job)
                batch.append(job)
        waiting.last = len(batch)
        waiting.taken, waiting.batches = waiting.taken + len(batch), waiting.batches + 1
        waiting.largest = max(waiting.largest, len(batch))
        return batch


def work(srv):
    """The worker: answer batches for as long as the server runs."""
    while True:
        batch = take(srv.waiting)
        try:
            answer(srv, batch)
            for job in batch:
                job.future.set_result(job)
        except Exception as e:  # noqa: BLE001 - each request reports it (a 500 with one log line)
            for job in batch:
                job.future.set_exception(e)


def answer(srv, batch):
    """Generate the batch's answers (none when max_new_tokens is 0: scoring only), then the log-probabilities
    of the jobs that asked for them."""
    if batch[0].seed is not None:
        torch.manual_seed(batch[0].seed)
    if batch[0].row.opts.max_new_tokens:  # together(): the batch shares sampling and end tokens, as generate needs
        model = srv.model if len(batch) == 1 else srv.batches  # one row: the compiled step where there is one
        for job, answer in zip(batch, GENERATE.generate(model, srv.tokenizer, [job.row for job in batch],
                                                          srv.compiled)):
            job.answer = answer
    for job in batch:
        if job.row.cancel.is_set():
            log(f"client went away: generation stopped after {len(job.answer.new_ids)} of at most "
                f"{job.row.opts.max_new_tokens} tokens")
        elif job.top is not None:
            job.logprobs = token_logprobs(srv.model, job)


def token_logprobs(model, job):
    """[(token id, its log-probability given the tokens before it, the top alternatives)] for the answer's
    tokens (its end token included), after the prompt's when echo; the very first token has no logprob."""
    ids = job.row.prompt_ids + job.answer.new_ids
    (_, lp), = score(model, [(ids, [-100] + ids[1:], range(len(ids)))])  # lp (len - 1, vocab): row t for t + 1
    first = 0 if job.echo else len(job.row.prompt_ids)
    out = []
    for t in range(first, len(ids)):
        if t == 0:
            out.append((ids[0], None, None))
            continue
        top = lp[t - 1].topk(job.top) if job.top else None
        out.append((ids[t], float(lp[t - 1, ids[t]]),
                    list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
    return out
