"""The printed table, the targets with PASS/MISS, and the JSON file."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from .metrics import Row

RESULTS = Path(__file__).resolve().parent / "results"
HEADERS = ("scenario", "N run", "makespan s", "ideal s", "effic.", "GETs med",
           "GETs mean", "max in flight (C)", "429s", "worker peak RSS MB", "Redis cmds/job")


def row_cells(row: Row, c: int) -> list[str]:
    star = "*" if row.extrapolated else ""
    redis = "-" if row.extra.get("redis") == "not used" else f"{row.redis_cmds_per_job:.1f}"
    return [row.name, f"{row.n_run}{star}", f"{row.makespan_s:.1f}{star}",
            f"{row.ideal_s:.1f}{star}", f"{row.efficiency:.3f}", f"{row.gets_median:g}",
            f"{row.gets_mean:.2f}", f"{row.max_in_flight} ({c})", str(row.rate_limited),
            f"{row.worker_peak_rss_mb:.0f}", redis]


def format_table(rows: list[Row], c: int) -> str:
    cells = [list(HEADERS)] + [row_cells(row, c) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths, strict=False)))
             for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    notes = [f"  * {row.name}: {row.note}" for row in rows if row.extrapolated]
    failed = [f"  ! {row.name}: {row.failed} job(s) failed" for row in rows if row.failed]
    return "\n".join(lines + notes + failed)


def targets(best_vidq: Row | None, c: int, enqueue: dict | None, download: dict | None) -> list:
    """(name, measured, target, passed) for every target that was measured."""
    found = []
    if best_vidq:
        found += [
            ("vidq efficiency", f"{best_vidq.efficiency:.3f}", ">= 0.90",
             best_vidq.efficiency >= 0.90),
            ("vidq median GETs/video", f"{best_vidq.gets_median:g}", "<= 2",
             best_vidq.gets_median <= 2),
            ("vidq max in flight", str(best_vidq.max_in_flight), f"== {c}",
             best_vidq.max_in_flight == c)]
    if download:
        found += [
            ("download RSS growth", f"{download['vidq_rss_growth_mb']:.1f} MB", "< 64 MB",
             download["vidq_rss_growth_mb"] < 64),
            ("download vs plain copy", f"{download['ratio']:.0%}", ">= 80%",
             download["ratio"] >= 0.80)]
    if enqueue:
        found.append((f"enqueue {enqueue['prompts']:,}", f"{enqueue['seconds']:.1f} s",
                      f"< {30 * enqueue['prompts'] / 100_000:g} s",
                      enqueue["seconds"] < 30 * enqueue["prompts"] / 100_000))
    return found


def format_extras(enqueue: dict | None, download: dict | None, lag: dict | None,
                  generation_s: float) -> str:
    lines = []
    if enqueue:
        lines.append(f"enqueue throughput: {enqueue['prompts']:,} prompts in "
                     f"{enqueue['seconds']:.1f} s = {enqueue['prompts_per_s']:,.0f} prompts/s")
        lines.append(f"Redis memory per queued job: {enqueue['redis_bytes_per_job']:,.0f} bytes")
    if download:
        lines.append(f"download {download['bytes'] / 1e6:.0f} MB: plain copy "
                     f"{download['plain_mb_per_s']:.0f} MB/s, vidq {download['vidq_mb_per_s']:.0f}"
                     f" MB/s (ratio {download['ratio']:.2f}); RSS growth vidq "
                     f"{download['vidq_rss_growth_mb']:.1f} MB, plain "
                     f"{download['plain_rss_growth_mb']:.1f} MB")
        lines.append(f"  diagnosis: vidq path with storage fsync disabled "
                     f"{download['vidq_nofsync_mb_per_s']:.0f} MB/s "
                     f"(ratio {download['nofsync_ratio']:.2f}); plain copy + fsync "
                     f"{download['plain_fsync_mb_per_s']:.0f} MB/s (vidq/that = "
                     f"{download['ratio_vs_plain_fsync']:.2f}); medians of "
                     f"{len(download['runs']['plain'])} interleaved rounds")
    if lag:
        lines.append(f"vidq detection lag (T = {generation_s:.2f} s): median "
                     f"{lag['median_s']:.3f} s ({lag['median_of_T']:.1%} of T), p95 "
                     f"{lag['p95_s']:.3f} s ({lag['p95_of_T']:.1%} of T), "
                     f"mean {lag['mean_s']:.3f} s, "
                     f"max {lag['max_s']:.3f} s")
    return "\n".join(lines)


def format_targets(found: list) -> str:
    width = max((len(name) for name, *_ in found), default=0)
    return "\n".join(f"  {name.ljust(width)}  {measured:>10}  target {target:<9} "
                     f"{'PASS' if ok else 'MISS'}" for name, measured, target, ok in found)


def write_json(document: dict, prefix: str = "", latest: bool = True) -> Path:
    """bench/results/<prefix><UTC stamp>.json, and <prefix>latest.json unless
    `latest` is False; returns the stamped path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(document, indent=2, default=str)
    path = RESULTS / f"{prefix}{stamp}.json"
    path.write_text(text)
    if latest:
        (RESULTS / f"{prefix}latest.json").write_text(text)
    return path
