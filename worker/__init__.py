"""vidq workers: the Celery app and the submit -> poll -> download chain.

`celery -A worker worker` finds `app` here. Importing this package reads no
setting and starts nothing.
"""
from .celery_app import app

__all__ = ["app"]
