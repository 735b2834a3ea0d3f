"""The expand build: adds a nullable column (safe while release 2 runs)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_heartbeat_queue")]

    operations = [
        migrations.AddField(
            model_name="heartbeat",
            name="note",
            field=models.CharField(blank=True, max_length=200, null=True),
        ),
    ]
