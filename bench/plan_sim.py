"""A discrete-event simulation of the poll plan: how many GETs a video costs,
how late its completion is seen, and how busy the C slots are kept.

What it models. C slots and N jobs. When a slot frees, the next job is
submitted DISPATCH_S later. Each job's true generation time is drawn from
N(T, (0.1 T)^2), redrawn until above 0.2 T, with T set per scenario (the prior is
always 90 s). A job polls at its submit plus the delays of the REAL
`PollPlan.delay` (worker/schedule.py), each delay plus a countdown/dispatch
jitter of U(0, JITTER_S). The plan is the REAL `plan_from`, cached for
`cache_s` like `DurationModel`, and like it dropped when a completion is
recorded. A poll at age >= the generation time finds the video done: a
Sample(previous poll age or 0, this poll age), flagged by the REAL
`mark_late` as `DurationModel.record` does, goes first into a list kept to
WINDOW, the slot frees. While fewer than WINDOW samples are known, the ages at
their last poll of the jobs still running (polled at least once) are passed
too. Re-aim (worker/reaim.py) is modelled after each completion, as
`worker/learning.learn` does it (`--no-reaim` turns it off).

What it does not model: no HTTP, no Redis, no Celery, no downloads, no
failures or 429s, one worker process (one plan cache), no overdue/deadline
polling. Times are simulated seconds; a run takes milliseconds of CPU per job.
"""
from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from dataclasses import dataclass

from worker import schedule
from worker.durations import cache_s
from worker.fit import normal_cdf, normal_pdf
from worker.reaim import REAIM_SHARE
from worker.schedule import (
    WINDOW,
    PollPlan,
    Sample,
    aimed_plan,
    fitted,
    mark_late,
    plan_from,
)

PRIOR_S, MIN_S = 90.0, 0.5  # the production defaults (bench/config.py)
MAX_S = 600.0  # the longest countdown (VIDQ_POLL_MAX_INTERVAL_S)
DISPATCH_S, JITTER_S, SPREAD = 0.02, 0.02, 0.1
SCENARIOS = {  # the true generation time T of job i of n, as in bench.timing
    "right": lambda i, n: 90.0, "true5": lambda i, n: 5.0, "true30": lambda i, n: 30.0,
    "true270": lambda i, n: 270.0, "drift": lambda i, n: 90.0 if i < n // 2 else 45.0,
    "slower": lambda i, n: 90.0 if i < n // 2 else 180.0}


@dataclass
class Job:
    submit: float
    gen: float
    t: float  # the scenario's T when it was submitted
    polls: int = 0
    last_age: float = 0.0
    token: int = 0
    first_aim: float = 0.0
    aimed_second: float = 0.0  # the second aim of the plan that aimed it (0: unlearned)
    detect: float = -1.0  # when a poll found it done; -1 until then


class Sim:
    def __init__(self, scenario: str, seed: int, n: int, cap: int, reaim: bool,
                 max_s: float = MAX_S):
        random.seed(seed)  # PollPlan.delay's own step jitter
        self.rng = random.Random(seed)
        self.true_t, self.n, self.cap = SCENARIOS[scenario], n, cap
        self.reaim, self.max_s = reaim, max_s
        self.jobs: list[Job] = []
        self.samples: list[Sample] = []
        self.cached: tuple[PollPlan, float] | None = None
        self.last_aim: float | None = None  # reaim.aim_dropped's memory
        self.events: list[tuple[float, int, int, int]] = []  # time, seq, job, token
        self.seq = self.in_flight = self.max_in_flight = self.fits = 0

    def plan(self, now: float) -> PollPlan:
        if self.cached and now - self.cached[1] < cache_s(self.cached[0]):
            return self.cached[0]
        running = [] if len(fitted(self.samples)[0]) >= WINDOW else [
            j.last_age for j in self.jobs if j.detect < 0 and j.polls >= 1]
        self.cached = (plan_from(self.samples, PRIOR_S, running), now)
        self.fits += 1
        return self.cached[0]

    def push(self, when: float, index: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, index, self.jobs[index].token))

    def schedule(self, index: int, now: float, delay: float) -> None:
        self.push(now + delay + self.rng.uniform(0, JITTER_S), index)

    def admit(self, now: float) -> None:
        """Take a slot now; the job is submitted DISPATCH_S later."""
        i = len(self.jobs)
        t = self.true_t(i, self.n)
        gen = self.rng.gauss(t, SPREAD * t)
        while gen <= 0.2 * t:
            gen = self.rng.gauss(t, SPREAD * t)
        submit = now + DISPATCH_S
        self.jobs.append(Job(submit, gen, t, token=-1))  # token -1: the submit event
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.push(submit, i)

    def submitted(self, i: int, now: float) -> None:
        job = self.jobs[i]
        job.token = 0
        plan = self.plan(now)
        job.first_aim = plan.delay(0, 0.0, MIN_S, self.max_s)
        job.aimed_second = plan.second_s or 0.0
        self.schedule(i, now, job.first_aim)

    def poll(self, i: int, now: float) -> None:
        job = self.jobs[i]
        job.polls += 1
        age = now - job.submit
        if age < job.gen:
            job.last_age = age
            return self.schedule(i, now, self.plan(now).delay(job.polls, age, MIN_S, self.max_s))
        job.detect = now
        lo = job.last_age if job.polls > 1 else 0.0
        sample = mark_late(self.plan(now), Sample(lo, age), job.aimed_second, self.samples)
        self.samples = [sample, *self.samples][:WINDOW]
        self.cached = None  # DurationModel.record drops the cached plan
        if self.reaim:
            self.reaim_first_polls(now)
        self.in_flight -= 1
        if len(self.jobs) < self.n:
            self.admit(now)

    def reaim_first_polls(self, now: float) -> None:
        """reaim.aim_dropped + reaim_first_polls, on the in-memory jobs."""
        first_s = self.plan(now).first_s
        last = self.last_aim
        dropped = last is not None and first_s < REAIM_SHARE * last
        if last is None or dropped or first_s > last:
            self.last_aim = first_s
        if dropped:
            self.move_first_polls(now, first_s, aimed_after=first_s / REAIM_SHARE)

    def move_first_polls(self, now: float, first_s: float, aimed_after: float) -> None:
        """Pending first polls aimed later than `aimed_after` go to `first_s`
        after their submit (a new token supersedes the old poll)."""
        for i, job in enumerate(self.jobs):
            age = now - job.submit
            if (job.detect < 0 and job.polls == 0 and job.token >= 0 and age >= 0
                    and job.first_aim > aimed_after and age < job.first_aim):
                job.token += 1
                job.first_aim = first_s
                self.schedule(i, now, max(first_s - age, MIN_S))

    def run(self) -> list[Job]:
        for _ in range(min(self.cap, self.n)):
            self.admit(0.0)
        while self.events:
            now, _, i, token = heapq.heappop(self.events)
            if token == -1 and self.jobs[i].token == -1:
                self.submitted(i, now)
            elif token == self.jobs[i].token and self.jobs[i].detect < 0:
                self.poll(i, now)
        return self.jobs


class Oracle(Sim):
    """A bound, not a plan: polls aimed by the exact plan for the true T and
    spread (no estimate, no cold start), switched at the first poll that finds
    a job of a new T done (the earliest news a plan without extra GETs gets),
    when every pending first poll is re-aimed at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exact = exact_plan(self.true_t(0, self.n))
        self.news_from = -1.0  # submit time of the job whose completion set the aims

    def plan(self, now: float) -> PollPlan:
        return self.exact

    def poll(self, i: int, now: float) -> None:
        job = self.jobs[i]
        # Only a job submitted after the one that set the aims is news: an old
        # job finishing late after a speed-up says nothing new.
        news = job.submit > self.news_from and exact_plan(job.t) != self.exact
        if news and now - job.submit >= job.gen:
            self.exact, self.news_from = exact_plan(job.t), job.submit
            self.move_first_polls(now, self.exact.first_s, aimed_after=0.0)
        super().poll(i, now)


def exact_plan(t: float) -> PollPlan:
    """plan_from's aims with the spread known and no estimate's error."""
    return aimed_plan(math.log(t), SPREAD, schedule.Z_SECOND)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def measure(jobs: list[Job], cap: int) -> dict:
    """One run's numbers; '3c': only the completions after the 3C-th (efficiency
    over the time from that completion to the last one)."""
    done = sorted(jobs, key=lambda j: j.detect)
    end, k = done[-1].detect, min(3 * cap, len(done) - 1)
    lag = [(j.detect - j.submit - j.gen) / j.t for j in done]
    gets = [j.polls for j in done]
    return {"eff_all": sum(j.gen for j in done) / cap / end,
            "eff_3c": sum(j.gen for j in done[k:]) / cap / (end - done[k - 1].detect),
            "gets_med": statistics.median(gets), "gets_mean": statistics.fmean(gets),
            "med_over_2": float(statistics.median(gets) > 2),
            "le2": sum(g <= 2 for g in gets) / len(gets),
            "lag_med": pct(lag, 0.5), "lag_p95": pct(lag, 0.95),
            "lag_med_3c": pct(lag[k:], 0.5), "lag_p95_3c": pct(lag[k:], 0.95),
            "makespan_s": end}


def zero_lag_efficiency(jobs: list[Job], cap: int) -> float:
    """The efficiency of the same jobs if every completion were seen at once:
    what slot hand-over and the batch's tail alone cost."""
    free = [0.0] * cap
    for job in jobs:  # in submit order
        start = heapq.heappop(free) + DISPATCH_S
        heapq.heappush(free, start + job.gen)
    return sum(j.gen for j in jobs) / cap / max(free)


def lag_floor() -> tuple[float, float]:
    """The smallest mean detection lag, in standard deviations of a normal
    generation time, of any plan that finds half the videos by its second
    poll: second poll at the median, the first where it is best, and later
    polls infinitely fine (as many GETs as it takes). Returns (lag, first)."""
    def waited(lo: float, poll: float) -> float:  # E[poll - Z; lo < Z <= poll]
        return poll * (normal_cdf(poll) - normal_cdf(lo)) - (normal_pdf(lo) - normal_pdf(poll))
    return min((waited(-12.0, z) + waited(z, 0.0), z) for z in (i / 1000 for i in range(-3000, 0)))


def one_run(args: tuple[str, int, int, int, bool, float], oracle: bool = False) -> dict:
    sim = (Oracle if oracle else Sim)(*args)
    jobs = sim.run()
    row = measure(jobs, sim.cap)
    row["eff_zero_lag"] = zero_lag_efficiency(jobs, sim.cap)
    row.update(seed=args[1], max_in_flight=sim.max_in_flight, fits=sim.fits)
    return row


# (key, header, format, worse is lower)
COLUMNS = [("eff_zero_lag", "eff 0-lag", "{:.3f}", True), ("eff_all", "eff all", "{:.3f}", True),
           ("eff_3c", "eff >3C", "{:.3f}", True),
           ("gets_med", "GETs med", "{:.2g}", False), ("med_over_2", "med>2 runs", "{:.0%}", False),
           ("gets_mean", "GETs mean", "{:.2f}", False),
           ("le2", "<=2 GETs", "{:.0%}", True), ("lag_med", "lag med/T", "{:.1%}", False),
           ("lag_p95", "lag p95/T", "{:.1%}", False), ("lag_med_3c", "med>3C/T", "{:.1%}", False),
           ("lag_p95_3c", "p95>3C/T", "{:.1%}", False),
           ("max_in_flight", "max infl", "{:g}", False)]


def summarize(rows: list[dict]) -> dict:
    avg = {key: statistics.fmean(r[key] for r in rows) for key, *_ in COLUMNS}
    worst = {key: (min if low else max)(r[key] for r in rows) for key, _, _, low in COLUMNS}
    return {"avg": avg, "worst": worst}


def table(results: dict, cap: int) -> str:
    head = ["scenario", *(h for _, h, _, _ in COLUMNS)]
    lines = [head] + [[name, *(f"{fmt.format(s['avg'][key])}/{fmt.format(s['worst'][key])}"
                               for key, _, fmt, _ in COLUMNS)] for name, s in results.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text + [f"cells: average over seeds / worst seed (C = {cap}); lags as a "
                             "share of each job's T; '>3C': after the first 3C completions; "
                             "'med>2 runs': share of seeds whose median is over 2 GETs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--cap", type=int, default=20)  # bench.timing's C
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append",
                        help="only this scenario (repeatable)")
    parser.add_argument("--max-s", type=float, default=MAX_S,
                        help="longest poll countdown (VIDQ_POLL_MAX_INTERVAL_S)")
    parser.add_argument("--no-reaim", action="store_true", help="do not model re-aim")
    parser.add_argument("--no-json", action="store_true", help="print only")
    parser.add_argument("--z-second", type=float,
                        help="aim the second poll this many spreads past the median (plus the "
                             "estimate's margin) instead of the plan's Z_SECOND: the trade-off "
                             "between GETs and lag")
    parser.add_argument("--oracle", action="store_true",
                        help="the bound: exact aims for the true T, switched at first news")
    args = parser.parse_args()
    names = args.scenario or list(SCENARIOS)
    if args.z_second is not None:
        schedule.Z_SECOND = args.z_second  # plan_from reads it at each call
    tasks = [(name, seed, args.jobs, args.cap, not args.no_reaim, args.max_s)
             for name in names for seed in range(args.seeds)]
    started = time.perf_counter()
    rows = [one_run(task, args.oracle) for task in tasks]
    runs = {name: [r for t, r in zip(tasks, rows, strict=True) if t[0] == name]
            for name in names}
    results = {name: summarize(runs[name]) for name in names}
    elapsed = time.perf_counter() - started
    print(table(results, args.cap))
    print(f"{len(tasks)} runs of {args.jobs} jobs, C={args.cap}, prior {PRIOR_S:g} s, "
          f"max countdown {args.max_s:g} s, re-aim {'off' if args.no_reaim else 'on'}, "
          f"second aim {schedule.Z_SECOND:g} spreads past the median"
          f"{', ORACLE (exact aims, not the plan)' if args.oracle else ''}: "
          f"{elapsed:.1f} s")
    floor, first = lag_floor()
    print(f"floor: with half the videos found by the second poll, the mean lag is at least "
          f"{floor:.3f} sd ({floor * SPREAD:.1%} of T at spread {SPREAD:g}; first poll at "
          f"{first:+.2f} sd), whatever the GETs after it")
    if not args.no_json:
        from .report import write_json
        document = {"params": vars(args), "elapsed_s": elapsed,
                    "lag_floor_sd": floor, "lag_floor_first_poll_sd": first,
                    "scenarios": {n: {**results[n], "runs": runs[n]} for n in names}}
        print(f"wrote {write_json(document, 'plan-sim-', latest=False)}")


if __name__ == "__main__":
    main()
