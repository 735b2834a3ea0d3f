"""deployd's migration inspector, run with `manage.py shell -c` in a one-off
container of a release's image, with the app's env and network.

It asks Django what `migrate` would do from the live migration state and
judges each operation by what it does to the release still running. It
never writes: the session is made read-only first, no migration is run
(RunPython code is never called), and the SQL is collected, not executed.

The request comes in the environment variable DEPLOYD_INSPECT (JSON):
  {"targets": [[app, name-or-null], ...]}   absent: every app's leaf (deploy)
The answer is on stdout, one JSON document a line, so that no line gets
long: `deployd-migration-plan: {..., "count": N}`, then N lines
`deployd-migration: {...}` in the order `migrate` runs them, then
`deployd-migration-plan-end`. A failure is `deployd-migration-plan:
{"error": "..."}`. The SQL of one migration is cut at SQL_LINES lines.
Works with Django 4.2 and later; imports nothing outside Django.
"""

import json
import os
import re
import sys

import django
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations import operations as ops
from django.db.migrations.executor import MigrationExecutor
from django.db.models import NOT_PROVIDED

MARKER = "deployd-migration-plan: "
MIGRATION = "deployd-migration: "
END = "deployd-migration-plan-end"
SQL_LINES = 200
SQL_LINE_CHARS = 2000

# Verdicts, from harmless to harmful to the release that still runs.
SAFE, LOCKING, REVIEW, IRREVERSIBLE, BREAKS = (
    "safe",
    "locking",
    "review",
    "irreversible",
    "breaks",
)
ORDER = [SAFE, LOCKING, REVIEW, IRREVERSIBLE, BREAKS]

READ_ONLY = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
    "sqlite": "PRAGMA query_only = ON",
}


def worst(verdicts):
    return max(verdicts, key=ORDER.index, default=SAFE)


def column(model, name):
    return f"{model}.{name}"


def field_type(field, connection):
    """The column type a field asks for, or its class when that needs the
    field bound to a model (a relation)."""
    try:
        return field.db_type(connection) or type(field).__name__
    except Exception:  # noqa: BLE001 - unbound relations cannot say
        return type(field).__name__


def base_type(text):
    return re.sub(r"\(.*\)", "", text).strip()


def has_db_default(field):
    return getattr(field, "db_default", NOT_PROVIDED) is not NOT_PROVIDED


def judge(op, app, state, connection):
    """(verdict, why) of one operation, with `state` the project state just
    before it."""
    postgres = connection.vendor == "postgresql"
    model = getattr(op, "model_name", None) or getattr(op, "name", "")
    if isinstance(op, ops.RunPython):
        if op.reversible:
            return SAFE, "data migration with reverse code"
        return IRREVERSIBLE, "RunPython without reverse code: it cannot be migrated back"
    if isinstance(op, ops.RunSQL):
        if not op.reversible:
            return IRREVERSIBLE, "RunSQL without reverse SQL: it cannot be migrated back"
        return REVIEW, "raw SQL: deployd cannot tell what it does to the running release"
    if isinstance(op, ops.SeparateDatabaseAndState):
        found = []
        inner = state.clone()
        for sub in op.database_operations:
            found.append(judge(sub, app, inner, connection))
            sub.state_forwards(app, inner)
        if not found:
            return SAFE, "changes Django's state only, not the database"
        verdict = worst(v for v, _ in found)
        return verdict, "; ".join(why for v, why in found if v == verdict)
    if not getattr(op, "reversible", True):
        return IRREVERSIBLE, "Django marks it irreversible"
    if isinstance(op, ops.CreateModel):
        return SAFE, "a new table the running release does not use"
    if isinstance(op, ops.DeleteModel):
        return BREAKS, f"drops the table of {app}.{op.name}, which the running release uses"
    if isinstance(op, ops.RenameModel):
        return BREAKS, (
            f"renames {app}.{op.old_name} to {op.new_name}: the running release "
            "uses the old table name"
        )
    if isinstance(op, ops.AlterModelTable):
        return BREAKS, f"renames the table of {app}.{op.name}, which the running release uses"
    if isinstance(op, ops.AlterOrderWithRespectTo):
        return BREAKS, f"adds or drops {app}.{op.name}._order, which the running release writes"
    if isinstance(op, ops.AddField):
        where = column(model, op.name)
        if op.field.many_to_many:
            return SAFE, f"a new join table for {where}"
        if op.field.null:
            return SAFE, f"{where} is nullable: the running release's inserts leave it NULL"
        if has_db_default(op.field):
            return SAFE, f"{where} has a database default the running release's inserts get"
        return BREAKS, (
            f"{where} is NOT NULL without a database default: the running release's "
            "inserts do not set it and fail"
        )
    if isinstance(op, ops.RemoveField):
        return BREAKS, (
            f"drops column {column(model, op.name)}, which the running release "
            "still selects and writes"
        )
    if isinstance(op, ops.RenameField):
        return BREAKS, (
            f"renames {column(model, op.old_name)} to {op.new_name}: the running "
            "release uses the old name"
        )
    if isinstance(op, ops.AlterField):
        where = column(model, op.name)
        try:
            old = state.models[app, op.model_name_lower].fields[op.name]
        except KeyError:
            return REVIEW, f"cannot find {where} as it was before"
        new = op.field
        if old.null and not new.null:
            return BREAKS, f"makes {where} NOT NULL: the running release may write NULL"
        old_type, new_type = field_type(old, connection), field_type(new, connection)
        if base_type(old_type) != base_type(new_type):
            return BREAKS, (
                f"changes the type of {where} from {old_type} to {new_type}, "
                "which the running release reads and writes"
            )
        if postgres and (
            (new.db_index and not old.db_index) or (new.unique and not old.unique)
        ):
            return LOCKING, f"builds an index on {where} without CONCURRENTLY: writes wait for it"
        if old_type != new_type:
            return SAFE, f"{where} stays {base_type(new_type)} ({old_type} to {new_type})"
        return SAFE, "no change the running release can see"
    index_ops = (ops.AddIndex, ops.AlterUniqueTogether)
    if hasattr(ops, "AlterIndexTogether"):
        index_ops += (ops.AlterIndexTogether,)
    if isinstance(op, index_ops):
        if postgres:
            return LOCKING, (
                "builds an index without CONCURRENTLY: writes to the table wait "
                "until it is built (AddIndexConcurrently does not block them)"
            )
        return SAFE, "an index the running release does not need"
    if isinstance(op, ops.AddConstraint):
        if postgres:
            return LOCKING, "checks every existing row under a lock: writes wait for it"
        return SAFE, "a constraint on existing columns"
    if isinstance(
        op,
        (
            ops.RemoveIndex,
            ops.RemoveConstraint,
            ops.AlterModelOptions,
            ops.AlterModelManagers,
        ),
    ):
        return SAFE, "nothing the running release depends on"
    if type(op).__name__ in (
        "AddIndexConcurrently",
        "RemoveIndexConcurrently",
        "RenameIndex",
        "AlterModelTableComment",
        "CreateExtension",
        "BtreeGinExtension",
        "TrigramExtension",
    ):
        return SAFE, "nothing the running release depends on"
    return REVIEW, f"deployd does not know {type(op).__name__}: read its SQL"


def inspect(connection, request):
    executor = MigrationExecutor(connection)
    loader = executor.loader
    conflicts = loader.detect_conflicts()
    if conflicts:
        names = "; ".join(f"{app}: {', '.join(sorted(n))}" for app, n in sorted(conflicts.items()))
        return {"error": f"conflicting migrations (run makemigrations --merge): {names}"}
    graph = loader.graph
    leaves = sorted(graph.leaf_nodes())
    if request.get("targets") is None:
        targets = leaves
    else:
        targets = [tuple(t) for t in request["targets"]]
        # An app the target does not name is new since: all of it goes back.
        named = {app for app, _ in targets}
        targets += sorted({(app, None) for app, _ in leaves if app not in named})
        for app, name in targets:
            if name is not None and (app, name) not in graph.nodes:
                return {"error": f"this release does not know the migration {app}.{name}"}
    plan = executor.migration_plan(targets)
    migrations = []
    for migration, backwards in plan:
        app = migration.app_label
        state = loader.project_state((app, migration.name), at_end=False)
        operations = []
        for op in migration.operations:
            verdict, why = judge(op, app, state, connection)
            operations.append(
                {
                    "operation": type(op).__name__,
                    "description": op.describe(),
                    "verdict": verdict,
                    "why": why,
                    "reversible": bool(getattr(op, "reversible", True)),
                }
            )
            op.state_forwards(app, state)
        try:
            sql = loader.collect_sql([(migration, backwards)])
        except Exception as e:  # noqa: BLE001 - irreversible backwards
            sql = [f"-- cannot be written as SQL: {type(e).__name__}: {e}"]
        sql = [line if len(line) <= SQL_LINE_CHARS else line[:SQL_LINE_CHARS] + " [...]" for line in sql]
        if len(sql) > SQL_LINES:
            more = len(sql) - SQL_LINES
            sql = sql[:SQL_LINES] + [f"-- [deployd: {more} more lines; see manage.py sqlmigrate]"]
        migrations.append(
            {
                "app": app,
                "name": migration.name,
                "backwards": backwards,
                "operations": operations,
                "sql": sql,
            }
        )
    return {
        "django": django.get_version(),
        "vendor": connection.vendor,
        "leaves": [list(leaf) for leaf in leaves],
        "migrations": migrations,
    }


def say(prefix, document):
    sys.stdout.write(prefix + json.dumps(document) + "\n")


def main():
    # One stream, written in order: nothing can land inside a line.
    sys.stderr = sys.stdout
    request = json.loads(os.environ.get("DEPLOYD_INSPECT") or "{}")
    connection = connections[request.get("database") or DEFAULT_DB_ALIAS]
    statement = READ_ONLY.get(connection.vendor)
    try:
        if statement:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        answer = inspect(connection, request)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        answer = {"error": f"{type(e).__name__}: {e}"}
    finally:
        connection.close()
    migrations = answer.pop("migrations", [])
    say(MARKER, {**answer, "count": len(migrations)})
    for migration in migrations:
        say(MIGRATION, migration)
    sys.stdout.write(END + "\n")
    sys.stdout.flush()


main()
