"""Flower's configuration file for vidq, executed by Flower at start:

    celery -A worker flower --conf=worker/flowerconfig.py ...

(the path is the same in a checkout and in the image, whose WORKDIR is /app).
It only adds the backlog rows to the Broker page (worker/flower_backlog.py);
every Flower option stays on the command line, where it can be read.
"""
from worker.flower_backlog import install

install()
