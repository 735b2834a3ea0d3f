"""Fault injection for the broken builds (see config/build.py).

Kept out of the views so that /healthz/ and /readiness/ stay the code a
real project would ship; good builds pass straight through.

Faults trigger on events, never on wall time: a test machine three times
slower than usual must see the same outcome.
"""

import fcntl
import os
import socket
import time

from django.http import JsonResponse

from config.build import BUILD

# unhealthy-after-5-checks: this many /healthz/ answers are 200, then 500.
# Only answers a client still waits for count: on a loaded machine a health
# check can give up on a booting container whose worker later serves the
# abandoned request, and counting those would spend the healthy answers
# before any check saw one.
HEALTHY_ANSWERS = 5
# Shared by the container's gunicorn workers (each is its own process).
COUNTER_FILE = os.environ.get("SHOP_HEALTH_COUNTER", "/tmp/shop-healthz-count")
PAGE_COUNTER_FILE = os.environ.get("SHOP_PAGE_COUNTER", "/tmp/shop-page-count")
# errors-10pct: one page request in this many answers 500.
FAILING_ONE_IN = 10
# Paths that are checks, not pages: the page faults leave them alone.
CHECKS = ("/healthz/", "/readiness/")


def _count_health_check():
    """Counts one /healthz/ request across every worker; returns the count."""
    return _count(COUNTER_FILE)


def _count(path):
    """Adds one to the count in `path`, across every worker; returns it."""
    with open(path, "a+", encoding="ascii") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        count = int(f.read() or "0") + 1
        f.seek(0)
        f.truncate()
        f.write(str(count))
        return count


def _client_gone(request):
    """Whether the client closed its connection before the answer: gunicorn
    hands the socket over in the environ; a peek that reads end-of-file
    means the client gave up."""
    sock = request.META.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def health_is_broken():
    if BUILD.variant == "healthz-500":
        return True
    # A host-specific fault: this build needs a setting one host lacks.
    if BUILD.variant == "needs-feature-key":
        return not os.environ.get("SHOP_FEATURE_KEY")
    return False


class BrokenHealthMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path != "/healthz/":
            return self.get_response(request)
        if health_is_broken():
            return self._broken()
        response = self.get_response(request)
        if (
            BUILD.variant == "unhealthy-after-5-checks"
            and response.status_code == 200
            and not _client_gone(request)
            and _count_health_check() > HEALTHY_ANSWERS
        ):
            return self._broken()
        return response

    @staticmethod
    def _broken():
        return JsonResponse({"status": "broken", "variant": BUILD.variant}, status=500)


class PageFaultsMiddleware:
    """errors-10pct and slow-3x: faults on pages only, so that the build
    passes every health check and only what real users get tells it apart."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if BUILD.variant not in ("errors-10pct", "slow-3x") or request.path in CHECKS:
            return self.get_response(request)
        if BUILD.variant == "errors-10pct":
            # The first, the eleventh, ...: a container that serves any page
            # serves an error, however few pages reach it.
            if _count(PAGE_COUNTER_FILE) % FAILING_ONE_IN == 1:
                return JsonResponse({"error": "injected", "variant": BUILD.variant}, status=500)
            return self.get_response(request)
        started = time.monotonic()
        response = self.get_response(request)
        time.sleep(2 * (time.monotonic() - started))
        return response
