"""gunicorn settings, read from the working directory (/app) at start."""

import os

# Two sync workers by default: enough for tests, small enough for 2-core hosts.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Logs go to stdout/stderr, collected by the container runtime.
accesslog = "-"
errorlog = "-"
# In-flight requests get this long after SIGTERM before workers are killed.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
