"""Breaking the metrics promise (issue 14) with faults the suite does not inject:
a 503 on a POST and 5xx answers on result downloads."""
from __future__ import annotations

import requests
from conftest import write_prompts
from test_metrics import exporter, scrape, value  # noqa: F401 - exporter is a fixture


def test_5xx_on_submit_and_download_match_the_ledger(make_pipeline, exporter, tmp_path):  # noqa: F811
    """Given a 503 on one POST and a 503 and a 500 on result downloads, every
    upstream call is counted once with its outcome and the rest match the ledger."""
    pipeline = make_pipeline()
    pipeline.faults(submit=[503], download=[503, 500])
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"five {i}" for i in range(4)]), "m5")
    counts = pipeline.wait_finished("m5", timeout_s=90)
    assert (counts["done"], counts["failed"]) == (4, 0), counts
    samples = scrape(exporter(pipeline.env, tmp_path / "logs" / "exporter.log"))
    ledger = pipeline.ledger()
    stats = requests.get(pipeline.sandbox.url + "/__stats", timeout=10).json()
    calls = "vidq_upstream_requests_total"
    assert value(samples, calls, call="submit", outcome="2xx") == len(ledger) == 4
    assert value(samples, calls, call="submit", outcome="5xx") == 1
    assert value(samples, calls, call="download", outcome="5xx") == 2
    assert value(samples, calls, call="download", outcome="2xx") == stats["downloads"] == 4
    assert value(samples, calls, call="status", outcome="2xx") == stats["polls"] == sum(
        entry["polls"] for entry in ledger)
    assert value(samples, "vidq_downloads_total") == 4
    assert value(samples, "vidq_download_bytes_total") == sum(e["size"] for e in ledger)
    assert sum(v for (n, _), v in samples.items() if n == "vidq_job_failures_total") == 0
