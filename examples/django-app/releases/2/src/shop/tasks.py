from celery import shared_task

from config.build import identity
from shop.models import Heartbeat


@shared_task(bind=True)
def heartbeat(self, scheduled_by):
    """Scheduled by beat; the row proves both beat and a worker are alive."""
    queue = (self.request.delivery_info or {}).get("routing_key")
    Heartbeat.objects.create(scheduled_by=scheduled_by, run_by=identity(), queue=queue)
