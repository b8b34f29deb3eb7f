"""SCHEDULER.py: which waiting requests generate together, and the queue's limits."""
import GENERATE
import SCHEDULER

GREEDY, WARM = GENERATE.sampling_of(True, 0, 0, 1), GENERATE.sampling_of(False, 0.8, 0, 1.0)


def job(n_prompt=4, max_new=8, sampling=GREEDY, eos=(0,), seed=None):
    return SCHEDULER.Job(GENERATE.Row([1] * n_prompt, GENERATE.Options(max_new, sampling, [], list(eos))), seed)


def test_take_groups_what_can_share_one_generate_call_in_arrival_order():
    w = SCHEDULER.Waiting(max_batch=3, max_waiting=10, context=32)
    a, b, chat, warm, c, d = job(), job(), job(eos=(0, 5)), job(sampling=WARM), job(), job()
    assert SCHEDULER.submit(w, [a, b, chat, warm, c, d])
    assert SCHEDULER.take(w) == [a, b, c]       # the same sampling and end tokens, up to max_batch
    assert SCHEDULER.take(w) == [chat]          # other end tokens (a chat's end of turn) wait for their own batch
    assert SCHEDULER.take(w) == [warm]
    assert SCHEDULER.take(w) == [d]
    assert (w.taken, w.batches, w.largest) == (6, 4, 3)  # what the server's log says as it stops


def test_a_seeded_sampled_request_runs_alone_and_rows_must_fit_the_context():
    w = SCHEDULER.Waiting(max_batch=8, max_waiting=10, context=32)
    seeded, other, greedy_seeded = job(sampling=WARM, seed=1), job(sampling=WARM, seed=1), job(seed=7)
    long, short = job(n_prompt=20, max_new=4), job(n_prompt=2, max_new=20)   # 20 + 20 > 32 together
    SCHEDULER.submit(w, [seeded, other, greedy_seeded, long, short])
    assert SCHEDULER.take(w) == [seeded]
    assert SCHEDULER.take(w) == [other]
    assert SCHEDULER.take(w) == [greedy_seeded, long]   # a seed changes nothing for a greedy answer
    assert SCHEDULER.take(w) == [short]


def test_a_full_queue_refuses_and_a_withdrawn_job_leaves_it():
    w = SCHEDULER.Waiting(max_batch=8, max_waiting=2, context=32)
    first, second = job(), job()
    assert SCHEDULER.submit(w, [first, second]) and not SCHEDULER.submit(w, [job()])
    SCHEDULER.withdraw(w, [first])
    assert first.row.cancel.is_set() and list(w.jobs) == [second] and SCHEDULER.submit(w, [job()])
