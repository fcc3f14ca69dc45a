"""Flower's configuration file for vidq, executed by Flower at start:

    celery -A worker flower --conf=worker/flowerconfig.py ...

(the path is the same in a checkout and in the image, whose WORKDIR is /app).
It adds the backlog rows to the Broker page (worker/flower_backlog.py) and
moves the periodic state save off Flower's event loop (worker/flower_save.py);
every Flower option stays on the command line, where it can be read.

Each hook wraps a Flower internal (flower 2.x is pinned): one that no longer
fits (a module moved, a class renamed) is logged and left out, and Flower
starts without it. Flower reads every global here that names one of its
options (`port`, `db`, `logging` ...): keep the names below private.
"""
from worker import flower_backlog as _backlog
from worker import flower_save as _save

for _hook in (_backlog, _save):
    try:
        _hook.install()
    except Exception:  # noqa: BLE001 - a dashboard hook is never worth a Flower that won't start
        _hook.log.warning("%s not installed: this Flower's internals differ; Flower starts "
                          "without it", _hook.__name__, exc_info=True)
