"""A replica that cannot acknowledge writes for a while (busy, stopped, its
link slow) while POSTs go out: the marker and the paid id are waited for
(worker/durability.py), and neither a job nor its paid video pays for the
wait. A real master and replica (AOF, appendfsync always), the sandbox over
HTTP, the steps of a worker driven by hand."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
import redis
from conftest import wait_until
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_steps import _admit_one, steps_for  # noqa: F401 - fixture

from producer.redis_server import PrivateRedis
from worker import keys
from worker.durability import Durability, NotDurable
from worker.marker import mark_posting
from worker.tasks import _run


@pytest.fixture
def replicated(tmp_path):
    """(master, replica), the replica connected."""
    master = PrivateRedis(tmp_path / "master").start()
    replica = PrivateRedis(tmp_path / "replica", extra_args=(
        "--replicaof", "127.0.0.1", str(master.port))).start()
    direct = redis.Redis(port=master.port, decode_responses=True)
    wait_until(lambda: direct.info("replication")["connected_slaves"] == 1, 10, "the replica")
    yield master, replica
    replica.stop()
    master.stop()


def _stalled(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.TimeoutError:
        return True
    return False


def test_a_paid_id_is_not_taken_as_recorded_until_the_replica_has_it(
        replicated, steps_for, make_sandbox):  # noqa: F811
    """A paid generation id is waited for as the POST marker is: while the replica
    cannot acknowledge it (busy for 5 s), recording it raises NotDurable, so the
    worker keeps the id and records it again (posting.record_paid), on the
    promoted replica if the master dies meanwhile. Taken as recorded at once, the
    id lived only on a master that could die before sending it on: after the
    failover the job had its marker and no id, and its paid video was lost."""
    master, replica = replicated
    steps = steps_for(make_sandbox(), VIDQ_REDIS_URL=f"redis://127.0.0.1:{master.port}/0")
    assert steps.durability.replicas == 1
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    assert mark_posting(steps.store, job, steps.durability) == "ok"
    busy = threading.Thread(target=redis.Redis(port=replica.port).execute_command,
                            args=("DEBUG", "SLEEP", "5"))
    busy.start()
    probe = redis.Redis(port=replica.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    wait_until(lambda: _stalled(probe), 10, "the replica busy")

    with pytest.raises(NotDurable) as raised:
        steps.store.record_generation(job, "gen-paid", 30.0, steps.durability)
    busy.join()

    assert raised.value.answer == "gen-paid"  # recorded on the master all the same
    assert steps.store.record_generation(job, "gen-paid", 30.0, steps.durability) == "gen-paid"
    on_replica = redis.Redis(port=replica.port, decode_responses=True)
    assert on_replica.hget(keys.job(ref), "generation_id") == "gen-paid"


def test_a_replica_stopped_after_a_201_delays_neither_the_poll_nor_other_jobs(
        replicated, steps_for, make_sandbox):  # noqa: F811
    """The replica is SIGSTOPped the moment a POST is answered 201 (the master
    still lists it for a minute). The paid job's step goes on at once to its
    first poll, the id kept being recorded until the replica has it (it waited
    for the whole POST deadline, logged "outcome unknown", and sent no poll). A
    job admitted meanwhile is not POSTed (its marker cannot be made durable) and
    tries again shortly, spending no attempt (it spent one per try: a replica
    stuck for minutes failed every admitted job); `vidq status` says why (only
    the worker log did)."""
    master, replica = replicated
    sandbox = make_sandbox()
    steps = steps_for(sandbox, VIDQ_REDIS_URL=f"redis://127.0.0.1:{master.port}/0",
                      VIDQ_POST_DEADLINE_S="20")
    real_submit = steps.client.submit

    def submit_then_stop_the_replica(request):
        generation = real_submit(request)  # answered 201: paid
        os.kill(replica.process.pid, signal.SIGSTOP)
        return generation

    ref, token = _admit_one(steps)
    steps.client.submit = submit_then_stop_the_replica
    try:
        started = time.monotonic()
        _run(steps, "submit", steps.claim(ref, token, "submit"))
        took_s = time.monotonic() - started
        steps.client.submit = real_submit
        other, other_token = _admit_one(steps, prompt="a second boat", job_id="j2")
        _run(steps, "submit", steps.claim(other, other_token, "submit"))
        waiting = steps.store.get(other)
        status = subprocess.run(["vidq", "status", "b"], capture_output=True, text=True,
                                env={**os.environ, "VIDQ_REDIS_URL": master.url}, timeout=60)
    finally:
        os.kill(replica.process.pid, signal.SIGCONT)
    on_replica = redis.Redis(port=replica.port, decode_responses=True)
    wait_until(lambda: on_replica.hget(keys.job(ref), "generation_id"), 30,
               "the paid id on the replica")

    paid = steps.store.get(ref)
    assert took_s < 10, f"the step waited {took_s:.1f} s for the replica"
    assert paid.state == "submitted" and paid.generation_id and not paid.last_error
    assert [step for step, job_ref, _ in steps.sent if job_ref == ref] == ["poll"]
    assert (waiting.state, waiting.attempts, waiting.step) == ("queued", 0, "submit")
    assert sandbox.stats()["submissions"] == 1
    assert ("could not make the last POST marker durable (WAIT: 0 of 1 replicas"
            in status.stdout), status
    resent = [token for step, job_ref, token in steps.sent if job_ref == other]
    assert resent, "the second job's submit was not sent again"
    _run(steps, "submit", steps.claim(other, resent[-1], "submit"))
    assert steps.store.get(other).generation_id and sandbox.stats()["submissions"] == 2


def test_wait_answers_are_checked_by_what_they_are_not_by_flags_refreshed_since(
        replicated):
    """A late POST's thread and the next step share one Durability: a refresh in
    one between the other's append_waits and check must not make check read a
    WAIT's answer as WAITAOF's or skip one. Each answer is read by its shape."""
    master, _ = replicated
    durability = Durability.probe(redis.Redis(port=master.port, decode_responses=True))
    assert (durability.waitaof, durability.replicas) == (False, 1)
    durability.check([1])
    durability.check([[1, 1]])  # a WAITAOF appended before a refresh turned it off
    with pytest.raises(NotDurable, match="WAITAOF"):
        durability.check([[0, 1]])
    with pytest.raises(NotDurable, match="WAIT: 0 of 1"):
        durability.check([[1, 0], 0])
