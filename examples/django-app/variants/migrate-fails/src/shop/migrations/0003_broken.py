"""The migrate-fails build: a data migration that raises, so migrate exits 1."""

from django.db import migrations


def fail(apps, schema_editor):
    raise RuntimeError("migrate-fails build: this migration always fails")


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_heartbeat_queue")]

    operations = [migrations.RunPython(fail, migrations.RunPython.noop)]
