"""vidq workers: the Celery app and the submit -> poll -> download chain.

`celery -A worker worker` finds `app` here.
"""
from .celery_app import create_app
from .settings import Settings

app = create_app(Settings.from_env())

from . import tasks  # noqa: E402,F401  (registers the step tasks on `app`)
