"""Flower's configuration file for vidq, executed by Flower at start:

    celery -A worker flower --conf=worker/flowerconfig.py ...

(the path is the same in a checkout and in the image, whose WORKDIR is /app).
It adds the backlog rows to the Broker page (worker/flower_backlog.py) and
moves the periodic state save off Flower's event loop (worker/flower_save.py);
every Flower option stays on the command line, where it can be read.
"""
from worker import flower_backlog, flower_save

flower_backlog.install()
flower_save.install()
