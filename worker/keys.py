"""Every Redis key vidq uses, in one place.

    vidq:job:<batch>:<id>       hash: one job's record (fields in `worker.jobs.Job`)
    vidq:batch:<batch>          hash: created_at, total; admission: priority, seq (enqueue
                                order), in_ring, paused, cancelled, blocked; spend:
                                max_credits, max_videos, credits_committed,
                                credits_spent, videos (see worker.spend)
    vidq:batch:<batch>:line     zset: the batch's waiting job ids (score: enqueue seq)
    vidq:batch:<batch>:counts   hash: state -> number of jobs in it
    vidq:batch:<batch>:jobs     set of job ids
    vidq:batch:<batch>:unknown  set of job ids failed "outcome unknown" (may have been charged)
    vidq:batch:<batch>:failed   set of job ids in state failed (kept by the scripts that
                                move a job in or out of it: `vidq retry` reads only these)
    vidq:batch:<batch>:finished hash: minute (Redis time // 60) -> jobs that ended then,
                                as `d:<minute>` (done) and `f:<minute>` (failed): the rate
    vidq:batch:<batch>:manifest string with a TTL: the one process writing the manifest
    vidq:batch:<batch>:enqueuing
                                string with a TTL: the one producer checking and writing
                                the batch's new jobs
    vidq:batch:<batch>:open_posts
                                zset: `<ref>#<marker call id>` of each POST on the wire
                                (score: its lease's end, Redis ms): `vidq purge` waits
    vidq:batches                set of batch names
    vidq:admission              old single waiting line (list of refs); drained once
                                into the batch lines by the pump (lua/pump.lua)
    vidq:ring:<priority>        list of batch names with waiting jobs, served round-robin
    vidq:spend:<day>            hash: committed, spent credits of a UTC day (day number
                                since the epoch); expires after a week
    vidq:slots                  zset: refs holding an upstream slot (score: admitted at)
    vidq:slot_holds             zset: failed refs whose slot is kept until the score
                                (an outcome-unknown POST the upstream may be generating;
                                '<ref>#<posting_op>' for an earlier POST of a re-POSTed job;
                                '<ref>#<generation id or posting_op>' for a purged job's
                                generation that may still run, lua/purge_jobs.lua)
    vidq:orphans                hash: generation id -> "<ref> <time>" of a POST that
                                answered after its batch was purged (never fetched)
    vidq:due                    zset: refs whose next step must have started by the score
    vidq:seq                    counter for step tokens
    vidq:pump:replay:<op>       string with a TTL (300 s): the jobs one pump call admitted,
                                answered again if that call is sent again (lost reply)
    vidq:metrics:replay:<op>    string with a TTL (300 s): that metrics write was applied
                                (a lost reply's re-send applies nothing)
    vidq:config                 hash: max_in_flight (C, one value per deployment);
                                effective_cap, cap_credit (C lowered after 429s)
                                daily_credits (the deployment's daily credit cap)
                                credit_estimate, credit_estimate@<model>@<RES> (the
                                workers' estimates: what the spend caps count)
                                deployment_id (names this Redis in the paid-id journal)
    vidq:worker_settings        hash: worker name -> JSON of the settings a deployment's
                                workers must share (worker/deployment.py)
    vidq:pause:submit           string with a TTL: the upstream said 429 to a POST;
                                no admission, no POST until it expires
    vidq:pause:poll             string with a TTL: the same for status GETs
    vidq:pause:submit:why       string with a TTL: the upstream refused the account (401,
                                403): its answer, for `vidq status`, while that pause lasts
    vidq:account:refusals       integer: 401/403 answers to POSTs in a row
    vidq:posts:turns            string with a TTL: the next free turn to POST (ms, Redis clock)
    vidq:posts:sent             zset with a TTL: POSTs sent in the last window (worker/pacing.py)
    vidq:worker:<hostname>      string with a TTL: that worker is alive
    vidq:workers                zset: worker names (score: last heartbeat, Redis time), so
                                live workers are found without scanning the keyspace
    vidq:reconcile:lock         string with a TTL: one reconciler pass at a time
    vidq:durations:<model>:<resolution>   list: recent generation times (seconds)
    vidq:events                 stream: video stored, job failed, batch finished (schema in
                                worker.events); trimmed to about VIDQ_EVENTS_MAXLEN
    vidq:webhook:<delivery>     hash: one webhook delivery (worker.webhooks); expires
    vidq:webhooks:<batch>       zset: the batch's deliveries (score: created at); expires
    vidq:webhooks_due           zset: pending deliveries by the time their attempt or
                                countdown must have ended; past it, its message was lost
                                and the relay sends it again (worker.webhooks)
    vidq:relay:lock             string with a TTL: one relay pass at a time (not under
                                vidq:webhooks:, where a batch named "relay" would land)
    vidq:metrics                hash: counters and histogram buckets the workers add to
                                and `vidq metrics` exports (fields: worker.metrics)
    vidq:reaim:<model>:<resolution>       the first-poll aim at the last re-aim
                                (worker.reaim)

Every score and lease is in Redis server time (`TIME`), so worker clocks never
have to agree.
"""
from __future__ import annotations

PREFIX = "vidq:"
JOB_PREFIX = PREFIX + "job:"
BATCHES = PREFIX + "batches"
ADMISSION = PREFIX + "admission"
BATCH_PREFIX = PREFIX + "batch:"
RING_PREFIX = PREFIX + "ring:"
SPEND_PREFIX = PREFIX + "spend:"
LINE_SUFFIX = ":line"
SLOTS = PREFIX + "slots"
SLOT_HOLDS = PREFIX + "slot_holds"
ORPHANS = PREFIX + "orphans"
# Spend booked by `vidq purge --force` for a purged job whose POST had no
# answer yet, by hold name ('<ref>#<op>'): given back if that POST is refused.
PURGED_BOOKINGS = PREFIX + "purged_bookings"
# Slot hold name of a purged job's generation nobody saw end -> its id
# (worker/purged_looks.py).
PURGED_GENERATIONS = PREFIX + "purged_generations"
# Such a hold's 404s in a row -> '<count> <first one's time>' (lua/purged_answer.lua).
PURGED_NOT_FOUND = PREFIX + "purged_not_found"
DUE = PREFIX + "due"
SEQ = PREFIX + "seq"
PUMP_REPLAY = PREFIX + "pump:replay:"  # + call id: what that pump call admitted
CONFIG = PREFIX + "config"
RECONCILE_LOCK = PREFIX + "reconcile:lock"
PAUSE_SUBMIT = PREFIX + "pause:submit"
PAUSE_POLL = PREFIX + "pause:poll"
# Why submits are paused, when the upstream refused the account (401, 403);
# lives as long as that pause.
PAUSE_SUBMIT_WHY = PREFIX + "pause:submit:why"
STORAGE_FAILING = PREFIX + "storage:failing"  # why, while storage fails (storage_pause)
# Why jobs wait to POST: Redis could not make a POST marker durable (a replica
# not acknowledging, an fsync stalled); lives a few of their retries.
MARKER_NOT_DURABLE = PREFIX + "marker:not_durable"
# 401/403 answers to POSTs in a row, deployment-wide; a recorded POST resets it.
ACCOUNT_REFUSALS = PREFIX + "account:refusals"
POST_TURNS = PREFIX + "posts:turns"  # when the next POST may be booked (worker/pacing.py)
POSTS_SENT = PREFIX + "posts:sent"  # POSTs sent in the last second or so
WORKER_PREFIX = PREFIX + "worker:"
WORKERS = PREFIX + "workers"
WORKER_SETTINGS = PREFIX + "worker_settings"
EVENTS = PREFIX + "events"
WEBHOOK_RELAY_LOCK = PREFIX + "relay:lock"
WEBHOOKS_DUE = PREFIX + "webhooks_due"
METRICS = PREFIX + "metrics"
METRICS_REPLAY = PREFIX + "metrics:replay:"  # + call id: that write was applied


def job_ref(batch: str, job_id: str) -> str:
    return f"{batch}:{job_id}"


def job(ref: str) -> str:
    return JOB_PREFIX + ref


def batch(name: str) -> str:
    return f"{PREFIX}batch:{name}"


def batch_counts(name: str) -> str:
    return f"{PREFIX}batch:{name}:counts"


def batch_jobs(name: str) -> str:
    return f"{PREFIX}batch:{name}:jobs"


def batch_unknown(name: str) -> str:
    return f"{PREFIX}batch:{name}:unknown"


def batch_failed(name: str) -> str:
    return f"{PREFIX}batch:{name}:failed"


def batch_finished(name: str) -> str:
    return f"{PREFIX}batch:{name}:finished"


def batch_enqueue_lock(name: str) -> str:
    # One lock for names that differ only in case: their enqueues refuse
    # each other's twin (producer/enqueue.py), so they must not interleave.
    return f"{PREFIX}batch:{name.lower()}:enqueuing"


def batch_open_posts(name: str) -> str:
    return f"{PREFIX}batch:{name}:open_posts"


def manifest_lock(name: str) -> str:
    return f"{PREFIX}batch:{name}:manifest"


def batch_line(name: str) -> str:
    return f"{BATCH_PREFIX}{name}{LINE_SUFFIX}"


def ring(priority: str) -> str:
    return RING_PREFIX + priority


def spend_day(day: int) -> str:
    return f"{SPEND_PREFIX}{day}"


def reaim(model: str, resolution: str) -> str:
    return f"{PREFIX}reaim:{model}:{resolution}"


def durations(model: str, resolution: str) -> str:
    return f"{PREFIX}durations:{model}:{resolution}"


def webhook_delivery(delivery_id: str) -> str:
    return f"{PREFIX}webhook:{delivery_id}"


def batch_webhooks(name: str) -> str:
    return f"{PREFIX}webhooks:{name}"


def worker_alive(hostname: str) -> str:
    return WORKER_PREFIX + hostname


# What a heartbeat (worker_alive) says the worker runs: `vidq status` counts
# the workers that run steps (one of another version writes "1": counted). One
# that only delivers webhooks moves no job: with nothing else alive, a batch
# stands still. A stopping one finishes the steps its pool runs, nothing more
# (worker/draining.py).
STEPS_WORKER, WEBHOOK_WORKER, STOPPING_WORKER = "1", "webhook", "stopping"
# Heartbeats of workers that will take no new step.
NOT_TAKING_STEPS = frozenset({WEBHOOK_WORKER, STOPPING_WORKER})
