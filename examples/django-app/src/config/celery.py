"""The Celery app: broker from settings, tasks from installed apps."""

import os
import sys

from celery import Celery
from celery.signals import worker_init

from config.build import BUILD

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.prod")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
def crash_if_broken_build(**_kwargs):
    """The worker-crash variant dies before consuming anything."""
    if BUILD.variant == "worker-crash":
        print("worker-crash build: exiting at start", file=sys.stderr, flush=True)
        os._exit(1)
