"""Start a vidq worker as `celery -A worker worker -Q Q -c N -n NAME
--loglevel INFO --without-mingle --without-gossip` does once it has parsed
its options: the same app, bootsteps, prefork pool and signal handling.

What it skips is Celery's command line, which loads every installed
`celery.commands` plugin (Flower and Tornado among them) and click-repl's
prompt_toolkit: about 0.7 s of CPU a start, on a suite that starts some 400
workers on two cores. It also skips what the command reads from CELERY_*
variables, which the tests never set. `vidq run`'s tests, and a few others,
still start workers with the command itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-Q", dest="queues", required=True)
    parser.add_argument("-c", dest="concurrency", type=int, required=True)
    parser.add_argument("-n", dest="hostname", required=True)
    options = parser.parse_args(argv)

    # As `-A worker` imports it: from the working tree this file is in.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from celery.utils.nodenames import default_nodename, host_format

    from worker import app

    worker = app.Worker(hostname=host_format(default_nodename(options.hostname)),
                        queues=options.queues.split(","), concurrency=options.concurrency,
                        loglevel="INFO", without_mingle=True, without_gossip=True)
    worker.start()
    return worker.exitcode or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
