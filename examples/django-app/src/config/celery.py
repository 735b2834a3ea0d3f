"""The Celery app: broker from settings, tasks from installed apps."""

import os
import sys

from config.build import BUILD

# The worker-crash variant dies as its worker starts, before celery loads
# anything: within a moment of the container's start on any machine, so a
# deployment's liveness window sees it, not verification after it.
if BUILD.variant == "worker-crash" and "worker" in sys.argv:
    print("worker-crash build: exiting at start", file=sys.stderr, flush=True)
    os._exit(1)

from celery import Celery  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.prod")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
