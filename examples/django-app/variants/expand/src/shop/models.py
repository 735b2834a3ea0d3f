from django.db import models


class Heartbeat(models.Model):
    """One tick of celery beat, recorded by the worker that ran it."""

    scheduled_by = models.CharField(max_length=128)
    run_by = models.CharField(max_length=128)
    created_at = models.DateTimeField(auto_now_add=True)
    # Release 2: the queue the tick was delivered on. Nullable, so release 1
    # keeps working against the migrated schema (rollback stays possible).
    queue = models.CharField(max_length=64, null=True, blank=True)
    # The expand build: a nullable column, the safe first half of a change.
    note = models.CharField(max_length=200, null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def as_dict(self):
        return {
            "id": self.id,
            "scheduled_by": self.scheduled_by,
            "run_by": self.run_by,
            "queue": self.queue,
            "created_at": self.created_at.isoformat(),
        }
