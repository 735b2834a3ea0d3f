"""deployd's migration inspector, run with `manage.py shell -c` in a one-off
container of a release's image, with the app's env and network (the
program itself comes in the environment variable DEPLOYD_INSPECTOR).

It asks Django what `migrate` would do from the live migration state and
judges each operation by what it does to the release still running: a
table or column that release never had (made earlier in the same plan) is
no concern of it. It never writes: everything runs in one read-only
transaction that is rolled back (PostgreSQL, MySQL; SQLite: query_only),
no migration is run (RunPython code is never called), and the SQL is
collected, not executed. A backend deployd cannot make read-only is
refused.

The request comes in the environment variable DEPLOYD_INSPECT (JSON):
  {"targets": [[app, name-or-null], ...]}   absent: every app's leaf (deploy)
The answer is on stdout, one JSON document a line, so that no line gets
long: `deployd-migration-plan: {..., "count": N, "tables": T}`, then N
lines `deployd-migration: {...}` in the order `migrate` runs them, T lines
`deployd-table: {"table": ..., "columns": [...]}` (what the release's own
models use), then `deployd-migration-plan-end`. A failure is
`deployd-migration-plan: {"error": "..."}`. The SQL of one migration is cut
at SQL_LINES lines.
Works with Django 4.2 and later; imports nothing outside Django.
"""

import json
import os
import re
import sys

import django
from django.apps import apps as django_apps
from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from django.db.backends.utils import truncate_name
from django.db.migrations import operations as ops
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.state import ProjectState
from django.db.models import NOT_PROVIDED, ForeignKey

MARKER = "deployd-migration-plan: "
MIGRATION = "deployd-migration: "
TABLE = "deployd-table: "
END = "deployd-migration-plan-end"
SQL_LINES = 200
SQL_LINE_CHARS = 2000
# deployd cuts output lines at 64 KiB: a migration's line stays under this.
DOCUMENT_CHARS = 48_000
# Operations listed one by one per migration (with their texts cut at
# SQL_LINE_CHARS, 10 fit in a document however long they are).
OPERATIONS = 10

# Verdicts, from harmless to harmful to the release that still runs.
SAFE, LOCKING, REVIEW, IRREVERSIBLE, BREAKS = (
    "safe",
    "locking",
    "review",
    "irreversible",
    "breaks",
)
ORDER = [SAFE, LOCKING, REVIEW, IRREVERSIBLE, BREAKS]

# The first statement of the inspection's transaction; SQLite's pragma holds
# for the connection, closed at the end. MySQL takes SET TRANSACTION only
# before a transaction starts, so it is the session's (the connection is
# closed at the end, never handed back to a pool of the app's).
READ_ONLY = {
    "postgresql": "SET TRANSACTION READ ONLY",
    "sqlite": "PRAGMA query_only = ON",
}
READ_ONLY_SESSION = {
    "mysql": "SET SESSION TRANSACTION READ ONLY",
}
# Column types a change between does not break the code that reads them
# (Python sees the same values); the table is rewritten meanwhile.
WIDENED = {
    ("smallint", "integer"),
    ("smallint", "bigint"),
    ("integer", "bigint"),
    ("serial", "bigserial"),
    ("varchar", "text"),
    ("char", "varchar"),
    ("char", "text"),
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


def field_column(field, name):
    """The column of a (possibly unbound) field named `name`, as Django
    names it; None for a many-to-many field, which has none."""
    if field.many_to_many:
        return None
    if field.db_column:
        return field.db_column
    return f"{name}_id" if isinstance(field, ForeignKey) else name


def makes_not_null(op, state, app):
    """Whether an AlterField makes a nullable column NOT NULL."""
    found = state.models.get((app, op.model_name_lower))
    old = found.fields.get(op.name) if found is not None else None
    return old is not None and old.null and not op.field.null


def base_type(text):
    return re.sub(r"\(.*\)", "", text).strip()


def size(text):
    found = re.search(r"\((\d+)", text)
    return int(found.group(1)) if found else None


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
        if field_column(old, op.name) != field_column(new, op.name):
            return BREAKS, (
                f"renames the column of {where} from {field_column(old, op.name)} to "
                f"{field_column(new, op.name)}: the running release uses the old name"
            )
        if old.null and not new.null:
            return BREAKS, f"makes {where} NOT NULL: the running release may write NULL"
        old_type, new_type = field_type(old, connection), field_type(new, connection)
        old_base, new_base = base_type(old_type), base_type(new_type)
        if (old_base, new_base) in WIDENED:
            return LOCKING, (
                f"widens {where} from {old_type} to {new_type}: the running release "
                "reads it as before, but the table is rewritten meanwhile"
            )
        if old_base != new_base:
            return BREAKS, (
                f"changes the type of {where} from {old_type} to {new_type}, "
                "which the running release reads and writes"
            )
        old_size, new_size = size(old_type), size(new_type)
        if old_size and new_size and new_size < old_size:
            return BREAKS, (
                f"shortens {where} from {old_type} to {new_type}: longer values the "
                "running release writes are refused"
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


def known_to(base, op, app, before):
    """Whether the release that runs (its schema: `base`) has what a harmful
    operation touches (`before`: the state just before it): a table or
    column made earlier in the same plan is no concern of it."""
    if isinstance(op, ops.SeparateDatabaseAndState):
        # Its inner operations were judged without the running schema: the
        # verdict stands.
        return True
    model = (getattr(op, "model_name_lower", None) or getattr(op, "name_lower", "") or "").lower()
    if not model:
        # It names no model: deployd cannot tell, so it keeps the verdict.
        return True
    if isinstance(op, ops.RenameModel):
        model = op.old_name_lower
    state = base.models.get((app, model))
    if state is None:
        return False
    if isinstance(op, ops.AlterField) and makes_not_null(op, before, app):
        # Its inserts leave a column they do not know NULL, and fail.
        return True
    if isinstance(op, (ops.RemoveField, ops.AlterField)):
        return op.name in state.fields
    if isinstance(op, ops.RenameField):
        return op.old_name in state.fields
    return True


def table_of(state, app, model):
    """The table of a model as the migration state has it before an
    operation, named as Django names it."""
    found = state.models.get((app, model.lower()))
    if found is not None and found.options.get("db_table"):
        return found.options["db_table"]
    # As Django's model options name it: by the default database's limit.
    limit = connections[DEFAULT_DB_ALIAS].ops.max_name_length()
    return truncate_name(f"{app}_{model.lower()}", limit)


def column_of(state, app, model, name):
    """The column of a field as the migration state has it, or None."""
    found = state.models.get((app, model.lower()))
    field = found.fields.get(name) if found is not None else None
    return None if field is None else field_column(field, name)


def touches(op, app, state):
    """The table (and column) a harmful operation harms the running release
    through, if it uses them: {"table": ..., "column": ... or None}. None
    where deployd cannot tell: the verdict stands whatever the running
    release's models are."""
    if isinstance(op, ops.RemoveField):
        model, name = op.model_name, op.name
    elif isinstance(op, ops.RenameField):
        model, name = op.model_name, op.old_name
    elif isinstance(op, (ops.AddField, ops.AlterField)):
        # Inserts that leave out a NOT NULL column fail, and a retyped
        # column rewrites or scans the table under a lock: harmless only to
        # a release with no model on the table at all.
        return {"table": table_of(state, app, op.model_name), "column": None}
    elif isinstance(op, (ops.DeleteModel, ops.AlterModelTable)):
        return {"table": table_of(state, app, op.name), "column": None}
    elif isinstance(op, ops.RenameModel):
        return {"table": table_of(state, app, op.old_name), "column": None}
    else:
        return None
    column = column_of(state, app, model, name)
    if column is None:
        return None
    return {"table": table_of(state, app, model), "column": column}


def used_tables():
    """The tables and columns this release's own models read and write:
    with a later release's plan, what its migrations may drop or change
    without breaking this one."""
    tables = {}
    for model in django_apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.proxy:
            continue
        columns = tables.setdefault(meta.db_table, set())
        columns.update(f.column for f in meta.local_concrete_fields if f.column)
    return [{"table": t, "columns": sorted(c)} for t, c in sorted(tables.items())]


def inner(op):
    """The operation, and those a SeparateDatabaseAndState runs on the
    database."""
    yield op
    if isinstance(op, ops.SeparateDatabaseAndState):
        for sub in op.database_operations:
            yield from inner(sub)


def reversible(op):
    return all(getattr(sub, "reversible", True) for sub in inner(op))


def runs_code(migration):
    """Whether collecting its SQL would call Python code of the project
    (a RunPython, also inside SeparateDatabaseAndState)."""
    return any(
        not getattr(sub, "reduces_to_sql", True) for op in migration.operations for sub in inner(op)
    )


def judge_against(base, op, app, state, connection):
    if not router.allow_migrate(connection.alias, app):
        return SAFE, f"{app} is not migrated on the database {connection.alias}"
    verdict, why = judge(op, app, state, connection)
    if verdict == BREAKS and not known_to(base, op, app, state):
        return SAFE, "on a table or column the running release does not have (made by this plan)"
    return verdict, why


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
    # The schema of the release that runs meanwhile: what is applied now
    # (a deployment), or the state gone back to (a rollback).
    if request.get("targets") is None:
        applied = [key for key in loader.applied_migrations if key in graph.nodes]
    else:
        applied = [(app, name) for app, name in targets if name is not None]
    base = loader.project_state(applied, at_end=True) if applied else ProjectState()
    # Forwards, each migration starts where the one before left the schema:
    # one pass over the plan, however long the history (rebuilding the
    # state of each from the first migration costs the square of it).
    forwards = request.get("targets") is None and not any(b for _, b in plan)
    # Built only for a plan that has migrations: most deployments have none.
    running = loader.project_state(applied, at_end=True) if forwards and plan else None
    migrations = []
    for migration, backwards in plan:
        app = migration.app_label
        if forwards:
            state = running
        else:
            state = loader.project_state((app, migration.name), at_end=False)
        operations = []
        for op in migration.operations:
            verdict, why = judge_against(base, op, app, state, connection)
            operation = {
                "operation": type(op).__name__,
                "description": op.describe()[:SQL_LINE_CHARS],
                "verdict": verdict,
                "why": why[:SQL_LINE_CHARS],
                "reversible": reversible(op),
            }
            if verdict == BREAKS:
                operation["touches"] = touches(op, app, state)
            operations.append(operation)
            op.state_forwards(app, state)
        if len(operations) > OPERATIONS:
            # The most harmful first, then a summary of the rest.
            operations.sort(key=lambda o: ORDER.index(o["verdict"]), reverse=True)
            rest = operations[OPERATIONS - 1 :]
            operations = operations[: OPERATIONS - 1] + [
                {
                    "operation": "More",
                    "description": f"{len(rest)} more operations",
                    "verdict": worst(o["verdict"] for o in rest),
                    "why": "not listed one by one: see manage.py sqlmigrate",
                    "reversible": all(o["reversible"] for o in rest),
                }
            ]
        if runs_code(migration):
            # Collecting it would run the code: nothing of the project runs.
            sql = ["-- runs Python code (RunPython): no SQL shown, nothing was run"]
        else:
            try:
                sql = loader.collect_sql([(migration, backwards)])
            except Exception as e:  # noqa: BLE001 - irreversible backwards
                sql = [f"-- cannot be written as SQL: {type(e).__name__}: {e}"[:SQL_LINE_CHARS]]
        sql = [line if len(line) <= SQL_LINE_CHARS else line[:SQL_LINE_CHARS] + " [...]" for line in sql]
        document = {
            "app": app,
            "name": migration.name,
            "backwards": backwards,
            "operations": operations,
            "sql": sql[:SQL_LINES],
        }
        while len(json.dumps(document)) > DOCUMENT_CHARS and document["sql"]:
            document["sql"] = document["sql"][: len(document["sql"]) // 2]
        more = len(sql) - len(document["sql"])
        if more:
            document["sql"].append(f"-- [deployd: {more} more lines; see manage.py sqlmigrate]")
        migrations.append(document)
    return {
        "django": django.get_version(),
        "vendor": connection.vendor,
        "leaves": [list(leaf) for leaf in leaves],
        "tables": used_tables(),
        "migrations": migrations,
    }


def say(prefix, document):
    sys.stdout.write(prefix + json.dumps(document) + "\n")


def read_only_inspection(connection, request):
    vendor = connection.vendor
    if vendor not in READ_ONLY and vendor not in READ_ONLY_SESSION:
        return {"error": f"deployd cannot make a {vendor} session read-only, so it plans nothing"}
    if vendor in READ_ONLY_SESSION:
        with connection.cursor() as cursor:
            cursor.execute(READ_ONLY_SESSION[vendor])
    with transaction.atomic(using=connection.alias):
        if vendor in READ_ONLY:
            with connection.cursor() as cursor:
                cursor.execute(READ_ONLY[vendor])
        answer = inspect(connection, request)
        transaction.set_rollback(True, using=connection.alias)
    return answer


def main():
    # One stream, written in order: nothing can land inside a line (logging
    # handlers made at setup hold the old stderr: its descriptor goes too).
    sys.stdout.flush()
    os.dup2(1, 2)
    sys.stderr = sys.stdout
    request = json.loads(os.environ.get("DEPLOYD_INSPECT") or "{}")
    connection = connections[request.get("database") or DEFAULT_DB_ALIAS]
    try:
        answer = read_only_inspection(connection, request)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        answer = {"error": f"{type(e).__name__}: {e}"[:SQL_LINE_CHARS]}
    finally:
        connection.close()
    migrations = answer.pop("migrations", [])
    tables = answer.pop("tables", [])
    say(MARKER, {**answer, "count": len(migrations), "tables": len(tables)})
    for migration in migrations:
        say(MIGRATION, migration)
    for table in tables:
        say(TABLE, table)
    sys.stdout.write(END + "\n")
    sys.stdout.flush()


main()
