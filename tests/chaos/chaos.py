"""The chaos runner: vidq's three promises under everything at once.

    report = run_chaos(parts, jobs=20, seed=1, kill_every_s=5, redis_restarts=1,
                       fault_rates=MODERATE)
    print(report.table()); assert not report.broken_promises()

Real parts: a sandbox upstream behind a FaultProxy (rewrite_urls=True, so result
downloads go through it too), a restartable redis-server (AOF, fsync always),
two `celery -A worker worker -c 2` processes. While random faults hit the POSTs,
the status GETs and the downloads, a random worker is SIGKILLed (its whole process
group) and replaced, and Redis is stopped and started again. Then the faults stop
and the batch must finish; the ledger of the sandbox, the job records and the files
in storage are compared.

The long run (not part of the tests, about 6-8 minutes):

    python -m tests.chaos.chaos --long          # exit status 1 if a promise broke
    python -m tests.chaos.chaos --jobs 50 --duration 60 --kill-every 8 --redis-restarts 2
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis

from .faultproxy import FaultProxy

BATCH = "chaos"
FINAL = ("done", "failed")

# Fault rates: {(methods, path_prefix): {kind: probability}}.
POST_FAULTS = ("reset_after_send", "gateway_502", "trickle", "429", "503", "html_500",
               "truncate_json", "truncate_body")
MODERATE = {
    ("POST", "/v2/"): {"reset_after_send": 0.03, "gateway_502": 0.03, "trickle": 0.03,
                       "429": 0.08, "503": 0.05, "html_500": 0.04, "truncate_json": 0.03,
                       "truncate_body": 0.02},
    ("GET", "/v2/"): {"429": 0.08, "503": 0.05, "html_500": 0.05, "truncate_json": 0.05,
                      "slow_headers": 0.04},
    ("GET", "/files/"): {"truncate_body": 0.12, "503": 0.05, "html_500": 0.04,
                         "slow_headers": 0.05},
}
HEAVY = {
    ("POST", "/v2/"): {"reset_after_send": 0.04, "gateway_502": 0.04, "trickle": 0.04,
                       "429": 0.12, "503": 0.08, "html_500": 0.06, "truncate_json": 0.04,
                       "truncate_body": 0.03},
    ("GET", "/v2/"): {"429": 0.12, "503": 0.08, "html_500": 0.06, "truncate_json": 0.06,
                      "slow_headers": 0.06, "trickle": 0.02},
    ("GET", "/files/"): {"truncate_body": 0.2, "503": 0.06, "html_500": 0.05,
                         "slow_headers": 0.06, "429": 0.04},
}


@dataclass
class ChaosParts:
    """What run_chaos needs, from pytest fixtures or built by hand (see `main`).

    make_sandbox(**config overrides) -> started SandboxServer
    make_pipeline(sandbox, **worker env overrides) -> tests.conftest.Pipeline
    redis: a started producer.redis_server.PrivateRedis that may be stopped and started
    """

    make_sandbox: Callable
    make_pipeline: Callable
    redis: object
    work_dir: Path


@dataclass
class ChaosReport:
    jobs: int = 0
    seed: int = 0
    elapsed_s: float = 0.0
    chaos_s: float = 0.0
    kills: int = 0
    redis_restarts: int = 0
    storms: int = 0
    refusal_bursts: int = 0
    faults: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    generations: int = 0
    duplicate_posts: int = 0
    duplicates: dict = field(default_factory=dict)  # prompt -> generation ids
    lost_or_stuck: list = field(default_factory=list)  # job summaries
    outcome_unknown: int = 0
    other_failures: Counter = field(default_factory=Counter)  # reason -> jobs
    paid_not_downloaded: list = field(default_factory=list)  # (gen id, why)
    answer_lost_at_post: list = field(default_factory=list)  # gen ids (outcome unknown)
    kept_on_failure: list = field(default_factory=list)  # (gen id, ledger status)
    done: int = 0
    verified: int = 0
    unverified: list = field(default_factory=list)  # (job id, why)
    cap: int = 0  # C, VIDQ_MAX_IN_FLIGHT
    max_in_flight: int = 0  # most generations running upstream at once (the sandbox's count)
    workers_exited: int = 0  # died without being killed (replaced, like `vidq run` does)
    kill_log: list = field(default_factory=list)  # (s since start, jobs unfinished)
    restart_log: list = field(default_factory=list)
    log_dir: str = ""
    evidence_dir: str = ""  # set when a promise broke: logs, jobs.json, ledger.json
    storage_dir: str = ""

    def broken_promises(self) -> list[str]:
        broken = []
        if self.duplicate_posts:
            broken.append(f"never pay twice: {self.duplicate_posts} duplicate POST(s): "
                          f"{self.duplicates}")
        if self.lost_or_stuck:
            broken.append(f"{len(self.lost_or_stuck)} job(s) lost or stuck: "
                          f"{self.lost_or_stuck[:5]}")
        if self.paid_not_downloaded:
            broken.append(f"never lose a paid video: {len(self.paid_not_downloaded)} paid "
                          f"generation(s) neither downloaded nor kept by a failed job: "
                          f"{self.paid_not_downloaded[:5]}")
        completed_but_failed = [g for g, status in self.kept_on_failure if status == "completed"]
        if completed_but_failed:  # a paid video's download is retried until the hard limit
            broken.append(f"never lose a paid video: {len(completed_but_failed)} completed "
                          f"generation(s) whose job failed: {completed_but_failed[:5]}")
        if self.max_in_flight > self.cap:
            broken.append(f"never above the cap: {self.max_in_flight} generations ran "
                          f"upstream at once with C = {self.cap}")
        if self.workers_exited:
            broken.append(f"{self.workers_exited} worker process(es) exited on their own "
                          f"(see 'Unrecoverable error' in {self.log_dir})")
        if self.unverified:
            broken.append(f"{len(self.unverified)} done video(s) fail verification: "
                          f"{self.unverified[:5]}")
        return broken

    def table(self) -> str:
        faults = {k: v for k, v in sorted(self.faults.items()) if k != "forwarded"}
        rows = [
            ("jobs", f"{self.jobs} (seed {self.seed})"),
            ("time", f"{self.elapsed_s:.1f} s ({self.chaos_s:.1f} s of chaos)"),
            ("worker kills (SIGKILL)", f"{self.kills} at (s, jobs unfinished) "
                                       f"{self.kill_log}"),
            ("redis restarts", f"{self.redis_restarts} at {self.restart_log}"),
            ("429 storms on GET", self.storms),
            ("403 bursts to POSTs (credits out)", self.refusal_bursts),
            ("faults injected", f"{sum(faults.values())}: "
             + ", ".join(f"{k} {v}" for k, v in faults.items())),
            ("requests forwarded", self.faults.get("forwarded", 0)),
            ("final states", ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)),
            ("generations in ledger", self.generations),
            ("duplicate POSTs (must be 0)", self.duplicate_posts),
            ("jobs lost or stuck (must be 0)", len(self.lost_or_stuck)),
            ("failed: outcome unknown", self.outcome_unknown),
            ("failed: other", ", ".join(f"{r} x{n}" for r, n in self.other_failures.items())
             or 0),
            ("paid, answer lost at POST", len(self.answer_lost_at_post)),
            ("paid, kept by failed job", len(self.kept_on_failure)),
            ("paid, not downloaded (must be 0)", len(self.paid_not_downloaded)),
            ("videos verified (sha256)", f"{self.verified}/{self.done}"),
            (f"most generations upstream at once (C = {self.cap})", self.max_in_flight),
            ("workers exited on their own (must be 0)", self.workers_exited),
            ("logs", self.evidence_dir or self.log_dir),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        broken = self.broken_promises()
        lines.append("RESULT: " + ("all promises kept" if not broken
                                   else "BROKEN\n  " + "\n  ".join(broken)))
        rule = "-" * min(100, max(len(line) for line in lines[:-1]))
        return "\n".join([rule, *lines[:-1], rule, lines[-1]])


# -- the run ------------------------------------------------------------------
def run_chaos(parts: ChaosParts, *, jobs: int, seed: int, kill_every_s: float,
              redis_restarts: int, fault_rates: dict, duration_s: float | None = None,
              kills: int | None = None,
              time_scale: float = 60.0, max_in_flight: int = 4, workers: int = 2,
              concurrency: int = 2, storm_every_s: float = 0.0,
              finish_timeout_s: float = 120.0, env: dict | None = None,
              submits_per_s: int = 0, refusals: bool = False,
              log=print) -> ChaosReport:
    """Run `jobs` prompts under chaos for `duration_s` (default: enough for the kills),
    then without faults until every job is done or failed; verify and report.
    `submits_per_s`: the sandbox refuses POSTs past this many a (wall) second and
    the workers pace theirs at it. `refusals`: each storm also makes the sandbox
    answer the next 3-6 POSTs 403 (credits out: two jobs fail, submits pause)."""
    rng = random.Random(seed)
    started = time.monotonic()
    report = ChaosReport(jobs=jobs, seed=seed)
    sandbox = parts.make_sandbox(time_scale=time_scale, max_concurrency=1000, seed=seed,
                                 max_submits_per_s=submits_per_s)
    proxy = FaultProxy(sandbox.url, seed=seed, rewrite_urls=True, slow_s=1.0).start()
    pipeline = None
    try:
        worker_env = {"AIMLAPI_BASE_URL": proxy.url, "VIDQ_REDIS_URL": parts.redis.url,
                      "VIDQ_MAX_IN_FLIGHT": str(max_in_flight),
                      # Production's durations on the sandbox's clock.
                      "VIDQ_EXPECTED_GENERATION_S": f"{90.0 / time_scale:.2f}",
                      "VIDQ_MAX_SUBMITS_PER_S": str(submits_per_s or f"{2.0 * time_scale:.2f}"),
                      "VIDQ_DEADLINE_S": f"{1000.0 / time_scale:.2f}",
                      "VIDQ_OVERDUE_POLL_INTERVAL_S": f"{60.0 / time_scale:.2f}"}
        worker_env.update(env or {})
        pipeline = parts.make_pipeline(sandbox, **worker_env)
        report.log_dir = str(pipeline.log_dir)
        report.storage_dir = str(_storage_dir(pipeline.env["VIDQ_STORAGE_URL"]))
        pipeline.start_workers(count=workers, concurrency=concurrency)
        alive = list(pipeline.processes)
        prompts = [f"chaos {seed}-{i}: a paper boat drifting down a rainy street, shot {i}"
                   for i in range(jobs)]
        path = parts.work_dir / "chaos-prompts.txt"
        path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        for (methods, prefix), rates in fault_rates.items():
            proxy.set_rates(rates, methods=methods, path_prefix=prefix)
        pipeline.enqueue(path, BATCH)

        # The chaos window: a kill every ~kill_every_s (after the previous replacement is
        # ready), Redis restarts at random moments. With `kills`, the window lasts until
        # that many kills and every Redis restart happened; else until duration_s or the
        # batch is finished.
        if duration_s is None:
            duration_s = kill_every_s * ((kills or 2) + 0.5)
        chaos_start = time.monotonic()
        next_kill = chaos_start + kill_every_s * rng.uniform(0.6, 1.2)
        restarts_at = sorted(chaos_start + rng.uniform(0.15, 0.85) * duration_s
                             for _ in range(redis_restarts))
        next_storm = chaos_start + storm_every_s * rng.uniform(0.5, 1.5) if storm_every_s else None

        def replace(reason: str) -> None:
            pipeline.start_workers(count=1, concurrency=concurrency)  # a new name, a new log
            alive.append(pipeline.processes[-1])
            log(f"[chaos {time.monotonic() - started:6.1f}s] started worker pid "
                f"{alive[-1].pid} ({reason})")

        while True:
            now = time.monotonic()
            if kills is not None:
                if report.kills >= kills and not restarts_at:
                    break
            elif now - chaos_start >= duration_s or _finished(pipeline, jobs):
                break
            for process in [p for p in alive if p.poll() is not None]:
                alive.remove(process)
                report.workers_exited += 1
                log(f"[chaos {now - started:6.1f}s] worker pid {process.pid} EXITED on its "
                    f"own (status {process.returncode})")
                replace("replacing the exited one")
            if now >= next_kill and (kills is None or report.kills < kills):
                victim = rng.choice(alive)
                unfinished = _unfinished(pipeline)
                _kill_group(victim)
                alive.remove(victim)
                report.kills += 1
                report.kill_log.append((round(now - started, 1), unfinished))
                log(f"[chaos {now - started:6.1f}s] SIGKILL worker pid {victim.pid} "
                    f"({unfinished} jobs unfinished)")
                replace("replacing the killed one")
                next_kill = time.monotonic() + kill_every_s * rng.uniform(0.5, 1.5)
            if restarts_at and now >= restarts_at[0]:
                restarts_at.pop(0)
                unfinished = _unfinished(pipeline)
                parts.redis.stop()
                down = rng.uniform(1.0, 3.0)
                log(f"[chaos {now - started:6.1f}s] redis stopped for {down:.1f} s "
                    f"({unfinished} jobs unfinished)")
                time.sleep(down)
                parts.redis.start()
                report.redis_restarts += 1
                report.restart_log.append((round(now - started, 1), unfinished))
            if next_storm and now >= next_storm:
                # A window of time, as a rate limiter's: a number of 429s was
                # outpaced by the polls' shared pause (one GET a Retry-After),
                # and once stalled seed 57's batch for 200 s.
                proxy.queue_for("429", seconds=rng.uniform(1.0, 4.0), method="GET",
                                path_prefix="/v2/")
                report.storms += 1
                if refusals:
                    sandbox.state.add_faults({"submit": [403] * rng.randint(3, 6)})
                    report.refusal_bursts += 1
                next_storm = now + storm_every_s * rng.uniform(0.5, 1.5)
            time.sleep(0.1)
        report.chaos_s = time.monotonic() - chaos_start

        proxy.clear()
        log(f"[chaos {time.monotonic() - started:6.1f}s] faults off; waiting for the batch")
        deadline = time.monotonic() + finish_timeout_s
        while time.monotonic() < deadline and not _finished(pipeline, jobs):
            time.sleep(0.3)
        time.sleep(2.0)  # room for a wrongful late re-POST to show in the ledger
        report.workers_exited += sum(1 for p in alive if p.poll() is not None)
        report.faults = proxy.counts
        report.cap, report.max_in_flight = max_in_flight, sandbox.stats()["max_in_flight"]
        _verify(pipeline, prompts, report)
        if report.broken_promises():
            _keep_evidence(pipeline, parts, report)
    finally:
        proxy.stop()
        if pipeline is not None:
            pipeline.stop_workers()
    report.elapsed_s = time.monotonic() - started
    return report


def _keep_evidence(pipeline, parts: ChaosParts, report: ChaosReport) -> None:
    """Copy what explains a broken promise out of pytest's rotating tmp dirs: worker
    logs, every job record, the ledger, the Redis log, the report."""
    import shutil

    where = Path(tempfile.mkdtemp(prefix=f"vidq-chaos-evidence-{report.seed}-"))
    shutil.copytree(pipeline.log_dir, where / "logs", dirs_exist_ok=True)
    redis_log = Path(getattr(parts.redis, "state_dir", "")) / "redis.log"
    if redis_log.is_file():
        shutil.copy(redis_log, where / "redis.log")
    records = {job.id: job.extra for job in _jobs(pipeline) if job}
    (where / "jobs.json").write_text(json.dumps(records, indent=1, sort_keys=True))
    (where / "ledger.json").write_text(json.dumps(pipeline.ledger(), indent=1))
    (where / "report.txt").write_text(report.table() + "\n")
    report.evidence_dir = str(where)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (main process and pool children together).

    A worker started without a session of its own shares our process group; killing
    that group would kill this runner, so then the worker's process tree is killed."""
    pgid = os.getpgid(process.pid)
    if pgid != os.getpgid(0):
        os.killpg(pgid, signal.SIGKILL)
    else:
        import psutil

        try:
            tree = [psutil.Process(process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGKILL)
    process.wait()


def _unfinished(pipeline) -> int | str:
    try:
        return sum(1 for job in _jobs(pipeline) if job is None or job.state not in FINAL)
    except redis.RedisError:
        return "?"


def _jobs(pipeline) -> list:
    store = pipeline.store
    return [store.get(f"{BATCH}:{job_id}") for job_id in store.job_ids(BATCH)]


def _finished(pipeline, total: int) -> bool:
    try:
        jobs = _jobs(pipeline)
    except redis.RedisError:
        return False  # Redis is restarting
    return len(jobs) == total and all(job and job.state in FINAL for job in jobs)


def _storage_dir(url: str) -> Path:
    return Path(unquote(urlsplit(url).path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _summary(job) -> dict:
    names = ("state", "step", "generation_id", "attempts", "polls", "last_error", "holder",
             "posting_at", "recovered", "submitted_at", "completed_at", "due")
    return {"id": job.id, **{n: job.extra.get(n) for n in names if job.extra.get(n)}}


def _verify(pipeline, prompts: list[str], report: ChaosReport) -> None:
    jobs = [j for j in _jobs(pipeline) if j]
    ledger = pipeline.ledger()
    by_gen = {entry["id"]: entry for entry in ledger}
    by_prompt = {job.request["prompt"]: job for job in jobs}
    report.counts = {k: v for k, v in Counter(job.state for job in jobs).items()}
    report.generations = len(ledger)
    report.outcome_unknown = pipeline.store.outcome_unknown(BATCH)

    # Lost or stuck: a prompt with no job, or a job not done or failed.
    report.lost_or_stuck = [{"prompt": p, "state": "no job record"}
                            for p in prompts if p not in by_prompt]
    report.lost_or_stuck += [_summary(job) for job in jobs if job.state not in FINAL]

    # Never pay twice: one generation per prompt at most.
    per_prompt: dict[str, list[str]] = {}
    for entry in ledger:
        per_prompt.setdefault(entry["prompt"], []).append(entry["id"])
    report.duplicates = {p: ids for p, ids in per_prompt.items() if len(ids) > 1}
    report.duplicate_posts = sum(len(ids) - 1 for ids in per_prompt.values())

    for job in jobs:
        if job.state == "failed" and not job.last_error.startswith("outcome_unknown"):
            report.other_failures[job.last_error.split(":")[0][:60] or "?"] += 1

    # Never lose a paid video.
    for entry in ledger:
        job = by_prompt.get(entry["prompt"])
        if job is None:
            report.paid_not_downloaded.append((entry["id"], "no job for its prompt"))
        elif job.state == "done" and job.generation_id == entry["id"]:
            continue
        elif job.state == "failed" and job.generation_id == entry["id"]:
            report.kept_on_failure.append((entry["id"], entry["status"]))
        elif (job.state == "failed" and not job.generation_id
              and job.last_error.startswith("outcome_unknown")):
            report.answer_lost_at_post.append(entry["id"])  # by design: no idempotency key
        else:
            report.paid_not_downloaded.append(
                (entry["id"], f"job {job.id} {job.state} with generation "
                              f"{job.generation_id or 'none'}: {job.last_error[:80]}"))

    # Every done video: file sha256 == sidecar == job record == ledger.
    storage = Path(report.storage_dir)
    for job in jobs:
        if job.state != "done":
            continue
        report.done += 1
        video, card = storage / BATCH / f"{job.id}.mp4", storage / BATCH / f"{job.id}.json"
        entry = by_gen.get(job.generation_id)
        try:
            sidecar = json.loads(card.read_text())
            actual = _sha256(video)
        except (OSError, ValueError) as exc:
            report.unverified.append((job.id, f"unreadable: {exc}"))
            continue
        if entry is None:
            why = f"generation {job.generation_id!r} not in the ledger"
        elif entry["prompt"] != job.request["prompt"]:
            why = f"generation {job.generation_id} is another prompt's"
        elif not (actual == sidecar.get("sha256") == job.extra.get("sha256") == entry["sha256"]):
            why = (f"sha256 file {actual[:12]} sidecar {str(sidecar.get('sha256'))[:12]} "
                   f"record {str(job.extra.get('sha256'))[:12]} ledger "
                   f"{str(entry['sha256'])[:12]}")
        elif video.stat().st_size != entry["size"]:
            why = f"size {video.stat().st_size} != ledger {entry['size']}"
        elif sidecar.get("generation_id") != job.generation_id:
            why = "sidecar names another generation"
        else:
            report.verified += 1
            continue
        report.unverified.append((job.id, why))


# -- the command ----------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.chaos",
                                     description="vidq chaos run outside pytest")
    parser.add_argument("--long", action="store_true",
                        help="300 jobs, a kill every ~12 s for 4 min, 6 Redis restarts, "
                             "heavy faults and 429 storms")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--duration", type=float, default=None, help="seconds of chaos")
    parser.add_argument("--kill-every", type=float, default=5.0)
    parser.add_argument("--redis-restarts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--heavy", action="store_true", help="HEAVY fault rates")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the batch once faults stop")
    parser.add_argument("--submits-per-s", type=int, default=0, metavar="N",
                        help="the sandbox refuses POSTs past N a second; workers pace at N")
    parser.add_argument("--refusals", action="store_true",
                        help="each storm also answers the next 3-6 POSTs 403 (credits out)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 16)
    if args.long:
        plan = dict(jobs=300, duration_s=240.0, kill_every_s=12.0, redis_restarts=6,
                    fault_rates=HEAVY, storm_every_s=15.0, finish_timeout_s=300.0)
    else:
        plan = dict(jobs=args.jobs, duration_s=args.duration, kill_every_s=args.kill_every,
                    redis_restarts=args.redis_restarts,
                    fault_rates=HEAVY if args.heavy else MODERATE, storm_every_s=10.0,
                    finish_timeout_s=120.0)
    if args.timeout:
        plan["finish_timeout_s"] = args.timeout
    plan.update(submits_per_s=args.submits_per_s, refusals=args.refusals)

    tests_dir = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(tests_dir))
    import conftest  # Pipeline, FAST_WORKER_ENV: the same parts as the tests use

    from producer.redis_server import PrivateRedis
    from sandbox import SandboxConfig, SandboxServer

    work = Path(tempfile.mkdtemp(prefix="vidq-chaos-"))
    print(f"work directory {work} (logs, videos, redis state); seed {seed}")
    servers = []

    def make_sandbox(**overrides):
        options = {"api_key": "sk-chaos-1a2b3c4d", "time_scale": conftest.TIME_SCALE}
        options.update(overrides)
        server = SandboxServer(SandboxConfig(**options)).start()
        servers.append(server)
        return server

    def make_pipeline(sandbox, **overrides):
        env = dict(os.environ)
        for name in ("AIML_API_KEY", "VIDQ_STORAGE_URL", "VIDQ_ENDPOINT"):
            env.pop(name, None)
        env.update(conftest.FAST_WORKER_ENV)
        env.update({"AIMLAPI_BASE_URL": sandbox.url, "AIMLAPI_KEY": sandbox.config.api_key,
                    "VIDQ_STORAGE_URL": (work / "videos").as_uri(),
                    "VIDQ_JOURNAL_DIR": str(work / "journal")})
        env.update({k: str(v) for k, v in overrides.items()})
        (work / "logs").mkdir(exist_ok=True)
        return conftest.Pipeline(env, sandbox, work / "logs")

    server = PrivateRedis(work / "redis-restartable").start()
    try:
        report = run_chaos(ChaosParts(make_sandbox, make_pipeline, server, work),
                           seed=seed, **plan)
    finally:
        server.stop()
        for sandbox in servers:
            sandbox.stop()
    print(report.table())
    return 1 if report.broken_promises() else 0


if __name__ == "__main__":
    sys.exit(main())
