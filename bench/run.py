"""Entry point: `python -m bench.run [--n 1000] [--c 50] [--time-scale 15] [--quick]`.

Runs every scenario against its own sandbox and private Redis, prints a table
and the targets, and writes bench/results/<UTC timestamp>.json and latest.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from . import report
from .config import BenchConfig, quick_config
from .scenario_vidq import run_vidq
from .scenarios_baseline import run_naive, run_seed
from .scenarios_micro import run_download, run_enqueue_throughput

SCENARIOS = ("seed", "naive", "vidq", "enqueue", "download")
VIDQ_LAYOUTS = ((2, 4), (1, 8))  # (worker processes, -c each)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="prompts per pipeline run")
    parser.add_argument("--c", type=int, default=50, help="upstream concurrency cap C")
    parser.add_argument("--time-scale", type=float, default=15.0,
                        help="sandbox speed-up S; a generation takes about 90/S s")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (N=60, C=10, 10k enqueue, 20 MB download)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--layout", choices=[f"{p}x{c}" for p, c in VIDQ_LAYOUTS],
                        help="run vidq in this layout only (a long batch takes a while)")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> BenchConfig:
    if args.quick:
        return quick_config(args.time_scale)
    return BenchConfig(n=args.n, c=args.c, time_scale=args.time_scale)


def attempt(name: str, errors: dict, run):
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        return run()
    except Exception:
        errors[name] = traceback.format_exc()
        print(f"[bench] {name} FAILED:\n{errors[name]}", file=sys.stderr, flush=True)
        return None
    finally:
        print(f"[bench] {name} took {time.monotonic() - started:.0f} s", file=sys.stderr)


def run_all(cfg: BenchConfig, only: set[str], work: Path, logs: Path,
            layouts: tuple[tuple[int, int], ...] = VIDQ_LAYOUTS) -> dict:
    errors: dict[str, str] = {}
    rows = []
    if "seed" in only:
        rows.append(attempt("seed", errors, lambda: run_seed(cfg, work)))
    if "naive" in only:
        rows.append(attempt("naive", errors, lambda: run_naive(cfg, work, logs)))
    if "vidq" in only:
        for procs, conc in layouts:
            rows.append(attempt(
                f"vidq {procs}x{conc}", errors,
                lambda procs=procs, conc=conc: run_vidq(cfg, work, logs, procs, conc)))
    enqueue = attempt("enqueue", errors, lambda: run_enqueue_throughput(cfg, work)) \
        if "enqueue" in only else None
    download = attempt("download", errors, lambda: run_download(cfg, work)) \
        if "download" in only else None
    return {"rows": [r for r in rows if r], "enqueue": enqueue, "download": download,
            "errors": errors}


def present(cfg: BenchConfig, results: dict) -> dict:
    rows = results["rows"]
    vidq_rows = [r for r in rows if r.name.startswith("vidq")]
    best = max(vidq_rows, key=lambda r: r.efficiency, default=None)
    lag = best.extra["detection_lag"] if best else None
    found = report.targets(best, cfg.c, results["enqueue"], results["download"])
    print(f"\nvidq bench: N={cfg.n}, C={cfg.c}, time scale {cfg.time_scale:g} "
          f"(T = {cfg.generation_s:.2f} s){' [quick]' if cfg.quick else ''}\n")
    print(report.format_table(rows, cfg.c))
    if best:
        print(f"  best vidq layout: {best.note}")
    print()
    print(report.format_extras(results["enqueue"], results["download"], lag, cfg.generation_s))
    print("\ntargets:\n" + report.format_targets(found))
    for name in results["errors"]:
        print(f"\nscenario {name} did not finish; traceback in the JSON")
    return {"config": asdict(cfg), "rows": [r.to_json() for r in rows],
            "best_vidq": best.name if best else None, "enqueue": results["enqueue"],
            "download": results["download"], "detection_lag": lag,
            "targets": [dict(zip(("name", "measured", "target", "pass"), t, strict=False))
                        for t in found],
            "errors": results["errors"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = make_config(args)
    logs = report.RESULTS / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="vidq-bench-"))
    started = time.time()
    try:
        layouts = tuple((p, c) for p, c in VIDQ_LAYOUTS if args.layout in (None, f"{p}x{c}"))
        results = run_all(cfg, set(args.only.split(",")), work, logs, layouts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    document = present(cfg, results)
    document.update(started_at=started, wall_s=time.time() - started, worker_logs=str(logs))
    path = report.write_json(document)
    print(f"\nwrote {path} and {path.parent / 'latest.json'} "
          f"(whole run {document['wall_s']:.0f} s; worker logs in {logs})")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
