from celery import shared_task

from config.build import identity
from shop.models import Heartbeat


@shared_task
def heartbeat(scheduled_by):
    """Scheduled by beat; the row proves both beat and a worker are alive."""
    Heartbeat.objects.create(scheduled_by=scheduled_by, run_by=identity())
