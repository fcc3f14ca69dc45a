"""vidq workers: the Celery app and the submit -> poll -> download chain.

`celery -A worker worker` finds `app` here. Importing this package reads no
setting and starts nothing; the app, and Celery with it, is imported when
first asked for: a `vidq` command that refuses its settings, or sends no
task, never pays for it.
"""
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typed as what it is wherever `worker.app` is used
    from .celery_app import app

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from .celery_app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
