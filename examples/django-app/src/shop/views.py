import hashlib
import json
import time

import redis
from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from config.build import BUILD, identity
from shop.models import Heartbeat


def healthz(request):
    """Can this process serve? It answers, and reaches the database and the
    broker (a web process that cannot enqueue tasks is not healthy either).
    503 names what failed; each check gives up after a second, so a health
    check never hangs a gunicorn worker for long."""
    checks = {"database": _check_database, "broker": _check_broker}
    failed = {}
    for name, check in checks.items():
        try:
            check()
        except Exception as e:  # noqa: BLE001 - any failure is unhealthy
            failed[name] = f"{type(e).__name__}: {e}"[:200]
    if failed:
        return JsonResponse({"status": "unhealthy", **failed}, status=503)
    return JsonResponse({"status": "ok", "database": "ok", "broker": "ok"})


def _check_database():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_broker():
    client = redis.Redis.from_url(
        settings.CELERY_BROKER_URL, socket_connect_timeout=1, socket_timeout=1
    )
    try:
        client.ping()
    finally:
        client.close()


def release(request):
    """Which release and container served this request; no database."""
    return JsonResponse({"served_by": identity()})


def slow(request):
    """Answers after ?seconds= (at most 120): a long request in flight."""
    try:
        seconds = min(float(request.GET.get("seconds", "1")), 120.0)
    except ValueError:
        return JsonResponse({"error": "seconds must be a number"}, status=400)
    time.sleep(max(seconds, 0.0))
    return JsonResponse({"served_by": identity(), "slept": seconds})


@csrf_exempt
@require_POST
def echo(request):
    """Reads a JSON body whole (a form post or an API call would): how big it
    was and its SHA-256, so a test can tell it arrived intact."""
    body = request.body
    try:
        json.loads(body or b"null")
    except ValueError:
        return JsonResponse({"error": "the body is not JSON"}, status=400)
    return JsonResponse(
        {"served_by": identity(), "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    )


def readiness(request):
    """Readiness check with DB connection test."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return JsonResponse({"status": "ready", "db": "ok"})
    except Exception as e:
        return JsonResponse(
            {"status": "not ready", "db": str(e)},
            status=503,
        )


def heartbeats(request):
    """The latest beat ticks and which release served this request."""
    latest = [h.as_dict() for h in Heartbeat.objects.all()[:20]]
    return JsonResponse({"served_by": identity(), "heartbeats": latest})


def index(request):
    context = {"build": BUILD, "served_by": identity(), "beats": Heartbeat.objects.count()}
    return render(request, "shop/index.html", context)
