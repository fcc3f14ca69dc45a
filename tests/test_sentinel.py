"""Redis Sentinel: a run survives the loss of its Redis master, on real parts.

A master and a replica (AOF, appendfsync always), three sentinels (quorum 2,
down after 1 s), `celery -A worker worker` processes and the producer all
reaching Redis through `VIDQ_REDIS_URL=sentinel://...;...` plus
`VIDQ_REDIS_SENTINEL_MASTER`. The master is SIGKILLed mid-batch.
"""
from __future__ import annotations

import time
from collections import Counter

import pytest
import redis
from conftest import write_prompts

from producer.redis_server import PrivateRedis, PrivateSentinel, sentinel_url
from worker.connection import connect
from worker.errors import ConfigError
from worker.settings import Settings

MASTER = "vidqmaster"


def _until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = condition()
            if found:
                return found
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


class SentinelGroup:
    def __init__(self, base):
        self.master = PrivateRedis(base / "master").start()
        self.replica = PrivateRedis(base / "replica", extra_args=(
            "--replicaof", "127.0.0.1", str(self.master.port))).start()
        master = redis.Redis(port=self.master.port)
        _until(lambda: master.info("replication")["connected_slaves"] == 1, 10,
               "the replica connected")
        self.sentinels = [PrivateSentinel(base / f"sentinel{i}", MASTER, self.master.port)
                          .start() for i in range(3)]
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, decode_responses=True)
            _until(lambda c=client: (
                int(c.sentinel_master(MASTER)["num-other-sentinels"]) == 2
                and int(c.sentinel_master(MASTER)["num-slaves"]) == 1), 20,
                "every sentinel sees the replica and the other two")
        self.url = sentinel_url(self.sentinels)

    def stop(self):
        for server in (*self.sentinels, self.replica, self.master):
            server.stop()


@pytest.fixture
def sentinel_group(tmp_path):
    group = SentinelGroup(tmp_path / "ha")
    yield group
    group.stop()


def test_settings_fold_the_master_name_into_the_url_and_refuse_half_a_setup():
    settings = Settings.from_env({"VIDQ_REDIS_URL": "sentinel://h1:26379;sentinel://h2:26379",
                                  "VIDQ_REDIS_SENTINEL_MASTER": "mymaster"})
    assert settings.redis_url == "sentinel://h1:26379;sentinel://h2:26379?master_name=mymaster"
    with pytest.raises(ConfigError, match="VIDQ_REDIS_SENTINEL_MASTER"):
        Settings.from_env({"VIDQ_REDIS_URL": "sentinel://h1:26379"})
    with pytest.raises(ConfigError, match="not sentinel"):
        Settings.from_env({"VIDQ_REDIS_URL": "redis://h1:6379/0",
                           "VIDQ_REDIS_SENTINEL_MASTER": "mymaster"})


@pytest.mark.slow
def test_master_killed_mid_batch_fails_over_with_no_duplicate_post_and_no_lost_job(
        sentinel_group, make_pipeline, make_sandbox, tmp_path):
    """SIGKILL the master mid-batch: the sentinels promote the replica, the workers
    and the producer follow it, every job ends done, every prompt POSTed once."""
    group = sentinel_group
    sandbox = make_sandbox(time_scale=30, max_concurrency=100)
    pipeline = make_pipeline(sandbox, VIDQ_REDIS_URL=group.url,
                             VIDQ_REDIS_SENTINEL_MASTER=MASTER, VIDQ_EXPECTED_GENERATION_S=3)
    assert pipeline.store.redis.info("server")["tcp_port"] == group.master.port
    pipeline.start_workers(count=2, concurrency=2)
    prompts = [f"failover {i}" for i in range(12)]
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "ha")
    _until(lambda: pipeline.store.counts("ha")["done"] >= 1, 30, "a first job done")

    group.master.process.kill()  # SIGKILL: no shutdown, no last AOF write
    group.master.process.wait()
    promoted = ("127.0.0.1", group.replica.port)
    _until(lambda: all(s.master_address() == promoted for s in group.sentinels), 20,
           "the sentinels promoted the replica")
    counts = pipeline.wait_finished("ha", timeout_s=60)

    assert counts["done"] == 12, counts
    assert all(p.poll() is None for p in pipeline.processes), "a worker exited"
    ledger = Counter(entry["prompt"] for entry in pipeline.ledger())
    assert ledger == Counter({p: 1 for p in prompts})
    assert pipeline.store.redis.info("server")["tcp_port"] == group.replica.port
    logs = "".join(path.read_text(errors="replace")
                   for path in sorted(pipeline.log_dir.glob("worker-*.log")))
    assert "WAIT for 1 replica(s)" in logs  # the probe ran on the master, via Sentinel


def test_connect_reaches_the_new_master_and_reloads_scripts(sentinel_group):
    """The job store's client follows a failover, and a registered Lua script
    runs on the new master (NOSCRIPT there: redis-py loads it again)."""
    group = sentinel_group
    client = connect(group.url + "?master_name=" + MASTER)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    assert script(keys=["n"]) == 1
    assert client.execute_command("WAIT", 1, 2000) == 1
    group.master.process.kill()
    group.master.process.wait()
    promoted = ("127.0.0.1", group.replica.port)
    _until(lambda: all(s.master_address() == promoted for s in group.sentinels), 20,
           "the sentinels promoted the replica")
    # Redis 7 does not replicate the script cache (6.2 does): empty it either way.
    redis.Redis(port=group.replica.port).script_flush()

    started = time.monotonic()
    assert script(keys=["n"]) == 2  # its pooled connection was to the dead master
    assert time.monotonic() - started < 5
    assert client.info("server")["tcp_port"] == group.replica.port
