"""What a batch will take, said before it goes in: the capacity plan.

    plan: 10,000 videos at C = 2 and ~90 s each: about 5.2 days
      generation time: ~90 s for alibaba/wan2.1-t2v-turbo 720P (configured guess ...)
      to finish in 8 h you need C >= 29
      spend: about 1,200,000,000 credits (120,000 per video, estimated)

The C slots are the bottleneck, so a batch takes (its generation seconds plus
those of the jobs already waiting or in flight) / (C x SLOT_USE). Generation
times are the learned ones per (model, resolution) (`worker.schedule`), or the
configured guess when nothing is learned yet, which the plan says. Jobs of
other batches are counted in full: admission shares the slots between batches
round-robin, so they do not all run first, but the night's work is the sum.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from worker import keys
from worker.contract import shape_of
from worker.durations import DurationModel
from worker.errors import InputError
from worker.spend import CreditEstimates

# Share of the time a slot holds a generation: the rest is detection lag and
# the hand-over to the next job (bench.timing measured 0.90-0.93 at T = 6 s).
SLOT_USE = 0.9
_DEADLINE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Jobs ahead count at their own shapes' times, read from this many of each line.
AHEAD_SAMPLE = 50


@dataclass(frozen=True)
class Shape:
    model: str
    resolution: str
    videos: int
    generation_s: float
    learned: bool


@dataclass(frozen=True)
class CapacityPlan:
    shapes: tuple[Shape, ...]
    ahead: int  # jobs of the deployment already waiting or in flight
    cap: int
    credits: float
    ahead_s: float = 0.0  # generation seconds of the jobs ahead whose shape was read
    ahead_unread: int | None = None  # jobs ahead of unknown shape (None: all of them)
    dearest: float = 0.0  # the highest estimate of one new video

    @property
    def videos(self) -> int:
        return sum(shape.videos for shape in self.shapes)

    @property
    def work_s(self) -> float:
        own = sum(shape.videos * shape.generation_s for shape in self.shapes)
        mean = own / self.videos if self.videos else 0.0
        unread = self.ahead if self.ahead_unread is None else self.ahead_unread
        return own + self.ahead_s + unread * mean

    def duration_s(self) -> float:
        return self.work_s / (max(self.cap, 1) * SLOT_USE)

    def cap_needed(self, deadline_s: float) -> int:
        return max(1, math.ceil(self.work_s / (deadline_s * SLOT_USE)))

    def meets(self, deadline_s: float) -> bool:
        return self.duration_s() <= deadline_s

    def lines(self, deadline_s: float | None = None) -> list[str]:
        typical = self.work_s / max(self.videos + self.ahead, 1)
        out = [f"plan: {self.videos:,} video{'' if self.videos == 1 else 's'} at C = "
               f"{self.cap} and ~{_duration(typical)} "
               f"each: about {_duration(self.duration_s())}"]
        for shape in self.shapes:
            source = ("learned" if shape.learned else
                      "configured guess VIDQ_EXPECTED_GENERATION_S, nothing learned yet")
            out.append(f"  generation time: ~{_duration(shape.generation_s)} for "
                       f"{shape.model} {shape.resolution} ({source})")
        if self.ahead:
            out.append(f"  ahead of it: {self.ahead:,} jobs already waiting or in flight "
                       "(counted in full)")
        if deadline_s is not None:
            out.append(f"  to finish in {_duration(deadline_s)} you need "
                       f"C >= {self.cap_needed(deadline_s)}")
        per_video = self.credits / self.videos if self.videos else 0.0
        out.append(f"  spend: about {self.credits:,.0f} credits ({per_video:,.0f} per video, "
                   "estimated)")
        return out


def capacity_plan(client: redis.Redis, settings, requests: list[dict]) -> CapacityPlan:
    """The plan for `requests` (one per new job) on this deployment now."""
    durations = DurationModel(client, settings.expected_generation_s)
    counts = Counter(shape_of(r) for r in requests)
    shapes = []
    for (model, resolution), videos in sorted(counts.items()):
        generation_s, learned = durations.typical_s(model, resolution)
        shapes.append(Shape(model, resolution, videos, generation_s, learned))
    estimates = deployed_estimates(client, CreditEstimates.from_settings(settings), counts)
    groups = _ahead(client)
    ahead_s, unread = 0.0, 0
    for count, sample in groups:
        times = [durations.typical_s(*shape_of(r))[0] for r in sample]
        if times:
            ahead_s += count * sum(times) / len(times)
        else:
            unread += count
    each = [estimates.of(r) for r in requests]
    return CapacityPlan(tuple(shapes), sum(count for count, _ in groups),
                        _cap(client, settings), sum(each), ahead_s, unread,
                        max(each, default=0.0))


def deployed_estimates(client: redis.Redis, own: CreditEstimates,
                       shapes: Iterable[tuple[str, str]]) -> CreditEstimates:
    """The estimates the admission will commit (lua/line_lib.lua `estimate_of`):
    the deployment's for each shape, unless this shell's is higher. Priced on
    the shell's alone, a plan said "about 2 credits" for a batch the caps then
    stopped after one video."""
    config = client.hgetall(keys.CONFIG)

    def higher(shape: tuple[str, str]) -> float:
        mine = own.table.get(shape, own.default)
        raw = config.get(f"credit_estimate@{shape[0]}@{shape[1]}") or config.get(
            "credit_estimate")
        try:
            return max(mine, float(raw)) if raw else mine
        except ValueError:  # not a number: another version's, never in the way
            return mine

    return CreditEstimates(own.default, {shape: higher(shape) for shape in shapes})


def parse_deadline(text: str) -> float:
    """`8h`, `90m`, `2d`, `3600s` or plain seconds, as seconds."""
    match = _DEADLINE.match(text or "")
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--deadline {text!r}: use a positive number with s, m, h or d "
                         "(e.g. 8h)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _ahead(client: redis.Redis) -> list[tuple[int, list[dict]]]:
    """The jobs ahead, by line (each batch's waiting jobs, then the slots held):
    how many, and the requests of up to AHEAD_SAMPLE of them."""
    batches = sorted(str(name) for name in client.smembers(keys.BATCHES))
    pipe = client.pipeline(transaction=False)
    for name in batches:
        pipe.zcard(keys.batch_line(name))
        pipe.zrange(keys.batch_line(name), 0, AHEAD_SAMPLE - 1)
    answers = pipe.execute()
    lines = [(int(n or 0), [keys.job_ref(name, str(i)) for i in ids])
             for name, n, ids in zip(batches, answers[::2], answers[1::2], strict=True) if n]
    slots = [str(ref) for ref in client.zrange(keys.SLOTS, 0, -1)]
    lines.append((len(slots), slots))
    pipe = client.pipeline(transaction=False)
    for _, refs in lines:
        for ref in refs:
            pipe.hget(keys.job(ref), "request")
    found = iter(pipe.execute())
    return [(count, [json.loads(raw) for raw in [next(found) for _ in refs] if raw])
            for count, refs in lines]


def _cap(client: redis.Redis, settings) -> int:
    config = client.hgetall(keys.CONFIG)
    cap = int(config.get("max_in_flight") or settings.max_in_flight)
    effective = config.get("effective_cap")
    return min(cap, int(effective)) if effective else cap


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h".replace(".0 h", " h")
    return f"{seconds / 86400:.1f} days"


def plan_file(settings, path, defaults: dict, deadline: str | None) -> list[str]:
    """`vidq plan`: the plan for every prompt in a file."""
    from worker.connection import connect

    from .prompts import load_prompts

    deadline_s = parse_deadline(deadline) if deadline else None
    requests = [job.request for job in load_prompts(path, defaults).jobs]
    return capacity_plan(connect(settings.redis_url), settings, requests).lines(deadline_s)


def plan_check(client: redis.Redis, settings, deadline: str | None, force: bool, echo,
               max_credits: float | None = None):
    """For `vidq enqueue`: prints the plan of the new jobs and refuses (InputError,
    nothing enqueued) when it cannot meet the deadline, unless forced; warns of
    a --max-credits below what one of the new videos commits."""
    deadline_s = parse_deadline(deadline) if deadline else None

    def check(requests: list[dict]) -> None:
        if not requests:
            return
        plan = capacity_plan(client, settings, requests)
        for line in plan.lines(deadline_s):
            echo(line)
        if max_credits is not None and max_credits < plan.dearest:
            # Jobs are admitted in line order: one that can never fit stops the rest.
            echo(f"warning: --max-credits {max_credits:,.2f} is below one new video's estimate "
                 f"({plan.dearest:,.2f}): the batch stops at that job for good, 'paused: "
                 "spend cap' (`vidq limits NAME --max-credits` changes it)")
        if deadline_s is not None and not plan.meets(deadline_s) and not force:
            raise InputError(
                f"the batch cannot finish in {_duration(deadline_s)}: about "
                f"{_duration(plan.duration_s())} at C = {plan.cap}; it needs "
                f"C >= {plan.cap_needed(deadline_s)} (`vidq cap N`), or enqueue with --force")
    return check
