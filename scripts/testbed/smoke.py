"""Smoke test of the test bed's Python base image, run inside it once per build.

Wheels come from `pip download` on the host, whose resolver can miss what the
image's own interpreter needs (see examples/django-app/requirements.txt). So
this starts the real programs: gunicorn serving a request, a celery worker
running a task that celery beat scheduled. A missing module fails here, at
build time, instead of in a deployment test.
"""

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Everything the app and its transports import, including lazy imports.
MODULES = [
    "django", "gunicorn.app.wsgiapp", "whitenoise.middleware", "psycopg",
    "psycopg_binary", "celery", "celery.bin.celery", "kombu.transport.redis",
    "redis", "redis.asyncio", "async_timeout", "packaging.version",
]

WSGI = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
'''

CELERY = '''
from celery import Celery
import os
box = os.environ["SMOKE_DIR"]
app = Celery("smoke", broker="filesystem://")
app.conf.broker_transport_options = {
    "data_folder_in": box + "/queue", "data_folder_out": box + "/queue",
}
app.conf.beat_schedule = {"tick": {"task": "smoke.tick", "schedule": 0.5}}
app.conf.beat_schedule_filename = box + "/beat-schedule"

@app.task(name="smoke.tick")
def tick():
    open(box + "/ticked", "w").close()
'''


def wait_for(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    sys.exit(f"smoke test: {what} did not happen within {timeout:.0f}s")


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read() == b"ok"
    except OSError:
        return False


def main():
    for name in MODULES:
        __import__(name)
    work = Path(tempfile.mkdtemp())
    (work / "queue").mkdir()
    (work / "smokeapp.py").write_text(WSGI)
    (work / "smoke.py").write_text(CELERY)
    env = dict(os.environ, SMOKE_DIR=str(work), PYTHONPATH=str(work))
    procs = [
        subprocess.Popen(["gunicorn", "--bind", "127.0.0.1:8765", "smokeapp:app"], env=env, cwd=work),
        subprocess.Popen(["celery", "-A", "smoke", "worker", "--pool", "solo", "-l", "warning"], env=env, cwd=work),
        subprocess.Popen(["celery", "-A", "smoke", "beat", "-l", "warning"], env=env, cwd=work),
    ]
    try:
        wait_for(lambda: fetch("http://127.0.0.1:8765/"), "gunicorn answering")
        wait_for(lambda: (work / "ticked").exists(), "a beat-scheduled task run by the worker")
        for p in procs:
            if p.poll() is not None:
                sys.exit(f"smoke test: {p.args[0]} exited with {p.returncode}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
    print("smoke test passed: imports, gunicorn, celery worker and beat")


if __name__ == "__main__":
    main()
