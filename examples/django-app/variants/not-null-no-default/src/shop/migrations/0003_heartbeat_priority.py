"""The not-null-no-default build: a NOT NULL column without a database
default (unsafe: the running release's inserts do not set it)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_heartbeat_queue")]

    operations = [
        migrations.AddField(
            model_name="heartbeat",
            name="priority",
            field=models.IntegerField(default=0),
        ),
    ]
