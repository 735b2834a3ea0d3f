from django.db import models


class Heartbeat(models.Model):
    """One tick of celery beat, recorded by the worker that ran it."""

    scheduled_by = models.CharField(max_length=128)
    run_by = models.CharField(max_length=128)
    created_at = models.DateTimeField(auto_now_add=True)
    # The drop-column build: `queue` is gone, in one step. Release 2 still
    # selects it, so it fails from `migrate` until it stops running.

    class Meta:
        ordering = ["-id"]

    def as_dict(self):
        return {
            "id": self.id,
            "scheduled_by": self.scheduled_by,
            "run_by": self.run_by,
            "created_at": self.created_at.isoformat(),
        }
