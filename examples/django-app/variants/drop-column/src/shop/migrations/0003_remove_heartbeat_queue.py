"""The drop-column build: removes a column release 2 reads (unsafe)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_heartbeat_queue")]

    operations = [migrations.RemoveField(model_name="heartbeat", name="queue")]
