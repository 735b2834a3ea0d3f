"""Which build of the sample shop this process runs.

The test bed bakes `/app/build.json` into every image: the release (1, 2) and
the variant. Variants other than "good" are deliberately broken so that
deployd's failure handling can be tested against a real app:

- migrate-fails: a migration raises, so `manage.py migrate` exits non-zero;
- healthz-500: /healthz/ always answers 500;
- web-crash: gunicorn exits at start (the WSGI module raises on import);
- worker-crash: the celery worker exits at start;
- slow-boot: the WSGI module takes SHOP_SLOW_BOOT_SECONDS (default 20) to
  load, so web is healthy late;
- unhealthy-after-5-checks: /healthz/ answers 200 five times (counted across
  the container's workers, and only to a client still waiting), then 500: it
  passes the health gate, then fails verification, whatever the speed of the
  machine;
- needs-feature-key: /healthz/ answers 500 where SHOP_FEATURE_KEY is unset;
- errors-10pct: healthy, but one page request in ten answers 500: the
  first, the eleventh, ... (counted across the container's workers;
  /healthz/ and /readiness/ are not pages);
- slow-3x: healthy, but every page takes three times as long: after the
  view, it waits twice what the request took.

Four builds only add a migration on top of release 2, for deployd's
migration plan: drop-column and not-null-no-default break release 2 while it
still runs, expand is safe, irreversible-data has no reverse code.
"""

import json
import os
import socket
from dataclasses import dataclass

BUILD_FILE = os.environ.get("SHOP_BUILD_FILE", "/app/build.json")


@dataclass(frozen=True)
class Build:
    release: str
    variant: str


def _load():
    try:
        with open(BUILD_FILE, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return Build(release="dev", variant="good")
    return Build(release=str(data["release"]), variant=str(data["variant"]))


BUILD = _load()


def identity():
    """Who this process is: release, variant and container hostname."""
    return f"{BUILD.release}/{BUILD.variant}@{socket.gethostname()}"
