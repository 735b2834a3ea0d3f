from django.db import models


class Heartbeat(models.Model):
    """One tick of celery beat, recorded by the worker that ran it."""

    scheduled_by = models.CharField(max_length=128)
    run_by = models.CharField(max_length=128)
    created_at = models.DateTimeField(auto_now_add=True)
    # Release 2: the queue the tick was delivered on. Nullable, so release 1
    # keeps working against the migrated schema (rollback stays possible).
    queue = models.CharField(max_length=64, null=True, blank=True)
    # The not-null-no-default build: NOT NULL with a Python default only.
    # Django fills existing rows, then drops the default, so release 2's
    # inserts, which do not name the column, fail.
    priority = models.IntegerField(default=0)

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
