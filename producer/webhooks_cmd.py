"""`vidq webhooks NAME [--replay] [--json]`: a batch's webhook deliveries.

Registered on the `vidq` group by producer/cli.py. Lists every delivery of
the batch's events (to the deployment's URL and to the batch's own), with
its attempts and last answer; `--replay` sends the failed ones again, with
the same webhook-id, so a receiver that already has one ignores it.
"""
from __future__ import annotations

import json

import click

from worker import webhooks
from worker.errors import InputError
from worker.keys import BATCHES
from worker.netguard import redacted

from .cli import VidqCommand, cli_settings, main


@main.command(name="webhooks", cls=VidqCommand)
@click.argument("batch")
@click.option("--replay", is_flag=True, help="Send the failed deliveries again.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def webhooks_command(batch, replay, as_json):
    """List BATCH's webhook deliveries and failures; exit 1 if any failed
    (and was not replayed)."""
    from worker.connection import connect

    client = connect(cli_settings().redis_url)
    records = webhooks.deliveries(client, batch)
    if not records and not client.sismember(BATCHES, batch):
        raise InputError(f"no batch {batch!r} (and no webhook deliveries for it)")
    replayed = _replay(client, records) if replay else 0
    if replayed:
        records = webhooks.deliveries(client, batch)
    counts = summary(records)
    if as_json:
        click.echo(json.dumps({"batch": batch, "counts": counts, "replayed": replayed,
                               "deliveries": [as_row(r) for r in records]}))
    else:
        _print(batch, records, counts, replayed)
    if counts[webhooks.State.FAILED]:
        raise SystemExit(1)


def _replay(client, records: list[dict]) -> int:
    from worker.webhook_tasks import send_delivery

    replayed = 0
    for record in records:
        if record.get("state") == webhooks.State.FAILED and webhooks.reopen(client, record["id"]):
            send_delivery(record["id"], 0, 0.0)
            replayed += 1
    return replayed


def _print(batch: str, records: list[dict], counts: dict[str, int], replayed: int) -> None:
    click.echo(f"batch {batch}: {len(records)} webhook deliveries: "
               f"{counts['delivered']} delivered, {counts['pending']} pending, "
               f"{counts['failed']} failed"
               + (f"; {replayed} failed ones sent again" if replayed else ""))
    for record in records:
        answer = f"HTTP {record['last_status']}" if record.get("last_status") else "-"
        error = record.get("last_error") or ""
        click.echo(f"  {record.get('state', '?'):<9} {record.get('type', ''):<14} "
                   f"{record.get('event_id', '')} to {record.get('target', '')} "
                   f"{redacted(record.get('url', ''))}  attempts {record.get('attempts', 0)}, "
                   f"{answer}" + (f": {error}" if error and error != answer else ""))


def summary(records: list[dict]) -> dict[str, int]:
    counts = {webhooks.State.DELIVERED: 0, webhooks.State.PENDING: 0, webhooks.State.FAILED: 0}
    for record in records:
        state = record.get("state", webhooks.State.PENDING)
        counts[state] = counts.get(state, 0) + 1
    return counts


def as_row(record: dict) -> dict:
    """A record as `vidq webhooks --json` prints it: no body, URL without query."""
    return {"id": record.get("id"), "event_id": record.get("event_id"),
            "type": record.get("type"), "target": record.get("target"),
            "url": redacted(record.get("url", "")), "state": record.get("state"),
            "attempts": int(record.get("attempts") or 0),
            "last_status": record.get("last_status") or None,
            "last_error": record.get("last_error") or None,
            "replays": int(record.get("replays") or 0)}
