"""One large download into S3 storage: RSS growth and throughput (issue 12, section 1).

    python -m bench.s3_download [--rounds 3] [--bytes 200000000]

The bench.run "download" scenario with VIDQ_STORAGE_URL=s3://bucket/prefix:
a sandbox serves one finished video padded to --bytes (pad_video_to), and
each round runs vidq's real `Steps.download` in a fresh process
(`bench.download_probe vidq-s3`), which streams it into a multipart upload
with the default 8 MiB parts (VIDQ_S3_PART_BYTES unset). RSS growth is
measured as in bench.run: VmHWM of the probe process minus its RSS just
before the download (the boto3 client is built before that baseline).

The S3 endpoint is moto's standalone server in its own process
(`python -m moto.server`), so the bytes it holds are not counted in the
probe's RSS; throughput therefore includes moto's cost of receiving parts,
assembling the object and the copy_object that attaches the sha256.

After each round: the object exists with the served size, its metadata
sha256 equals the served file's, the sidecar exists, and the bucket has no
open multipart upload; then both objects are deleted. Medians over the
rounds. Writes bench/results/s3-download-<UTC>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from . import infra
from .config import BenchConfig
from .report import write_json
from .scenarios_micro import PROJECT, finished_video_url, probe_download

BUCKET, PREFIX = "vidq-bench", "videos"
BATCH, JOB = "dl", "big"  # the job record bench.download_probe makes
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server(log_path: Path, timeout_s: float = 30.0):
    """moto's S3 in its own process on a free port; yields its endpoint URL."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited early; see {log_path}")
            with contextlib.suppress(requests.ConnectionError):
                requests.get(endpoint + "/moto-api/", timeout=2)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server not up in {timeout_s:.0f} s; see {log_path}")
            time.sleep(0.1)
        yield endpoint, process.pid
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])


def probe_env(redis_url: str, sandbox_url: str, endpoint: str, work: Path) -> dict:
    """The environment of bench.run's download probe, plus a private AWS one."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VIDQ_", "AWS_"))}
    env.update(VIDQ_REDIS_URL=redis_url, AIMLAPI_BASE_URL=sandbox_url,
               AIMLAPI_KEY=infra.SANDBOX_KEY, AWS_ENDPOINT_URL=endpoint, **AWS_ENV,
               # no profile or config file of this machine can change the client
               AWS_CONFIG_FILE=str(work / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(work / "no-aws-credentials"))
    return env


def verify_round(client, served_size: int, served_sha256: str) -> dict:
    """The stored video and sidecar as the round left them; then delete both."""
    video, card = f"{PREFIX}/{BATCH}/{JOB}.mp4", f"{PREFIX}/{BATCH}/{JOB}.json"
    head = client.head_object(Bucket=BUCKET, Key=video)
    metadata = head.get("Metadata", {})
    uploads = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    sidecar = json.loads(client.get_object(Bucket=BUCKET, Key=card)["Body"].read())
    check = {"object_bytes": head["ContentLength"], "object_sha256": metadata.get("sha256"),
             "content_type": head.get("ContentType"), "metadata": metadata,
             "open_multipart_uploads": len(uploads), "sidecar_sha256": sidecar.get("sha256"),
             "etag": head.get("ETag")}
    check["ok"] = (check["object_bytes"] == served_size
                   and check["object_sha256"] == served_sha256
                   and check["sidecar_sha256"] == served_sha256
                   and check["open_multipart_uploads"] == 0)
    client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": video}, {"Key": card}]})
    return check


def run(rounds: int, size: int, work: Path) -> dict:
    cfg = BenchConfig()
    with moto_server(work / "moto.log") as (endpoint, moto_pid), \
            infra.private_redis(work / "redis-s3-download") as redis_server, \
            infra.sandbox(cfg.time_scale, cfg.c, pad_video_to=size) as server:
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        served = server.videos.get(1280, 720)
        url = finished_video_url(server)
        env = probe_env(redis_server.url, server.url, endpoint, work)
        runs = []
        for number in range(1, rounds + 1):
            result = probe_download("vidq-s3", url, f"s3://{BUCKET}/{PREFIX}", env)
            result["check"] = verify_round(client, served.size, served.sha256)
            result["moto_rss_mb_after"] = infra.tree_rss([moto_pid]) / 1e6
            runs.append(result)
            print(f"[s3-download] round {number}: {result['mb_per_s']:.1f} MB/s, RSS growth "
                  f"{result['rss_growth_mb']:.1f} MB, check "
                  f"{'ok' if result['check']['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
        ledger_size = infra.ledger(server)[0]["size"]
    return {"endpoint": "moto.server (separate process)", "bucket": BUCKET, "prefix": PREFIX,
            "part_bytes": 8 * 1024**2, "served_bytes": served.size,
            "served_sha256": served.sha256, "ledger_bytes": ledger_size, "rounds": rounds,
            "mb_per_s_median": statistics.median(r["mb_per_s"] for r in runs),
            "rss_growth_mb_median": statistics.median(r["rss_growth_mb"] for r in runs),
            "rss_growth_mb_max": max(r["rss_growth_mb"] for r in runs),
            "seconds_median": statistics.median(r["seconds"] for r in runs),
            "all_checks_ok": all(r["check"]["ok"] for r in runs)
            and all(r["bytes"] == served.size for r in runs),
            "runs": runs}


def format_table(summary: dict) -> str:
    header = f"{'round':<7}{'MB/s':>8}{'seconds':>9}{'RSS before MB':>15}{'RSS growth MB':>15}" \
             f"{'object ok':>11}{'open uploads':>14}"
    lines = [header, "-" * len(header)]
    for number, r in enumerate(summary["runs"], 1):
        lines.append(f"{number:<7}{r['mb_per_s']:>8.1f}{r['seconds']:>9.2f}"
                     f"{r['rss_before'] / 1e6:>15.1f}{r['rss_growth_mb']:>15.1f}"
                     f"{'yes' if r['check']['ok'] else 'NO':>11}"
                     f"{r['check']['open_multipart_uploads']:>14}")
    lines.append(f"{'median':<7}{summary['mb_per_s_median']:>8.1f}"
                 f"{summary['seconds_median']:>9.2f}{'':>15}"
                 f"{summary['rss_growth_mb_median']:>15.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.s3_download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=BenchConfig().download_bytes)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vidq-bench-s3-"))
    started = time.time()
    try:
        summary = run(args.rounds, args.bytes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nvidq Steps.download of a {summary['served_bytes'] / 1e6:.0f} MB video into "
          f"s3://{BUCKET}/{PREFIX} (moto server, own process), 8 MiB parts, "
          f"{args.rounds} rounds, each in a fresh process\n")
    print(format_table(summary))
    print(f"\nchecks (size, sha256 metadata, sidecar, no open multipart upload): "
          f"{'all ok' if summary['all_checks_ok'] else 'FAILED'}")
    document = {"command": "python -m bench.s3_download " + " ".join(argv),
                "started_at": started, "wall_s": time.time() - started, **summary}
    path = write_json(document, "s3-download-", latest=False)
    print(f"wrote {path.relative_to(PROJECT)}")
    return 0 if summary["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
