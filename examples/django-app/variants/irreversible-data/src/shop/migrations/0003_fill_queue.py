"""The irreversible-data build: a data migration without reverse code."""

from django.db import migrations


def fill_queue(apps, schema_editor):
    Heartbeat = apps.get_model("shop", "Heartbeat")
    Heartbeat.objects.filter(queue__isnull=True).update(queue="default")


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_heartbeat_queue")]

    operations = [migrations.RunPython(fill_queue)]
