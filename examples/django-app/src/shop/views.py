import time

from django.db import connection
from django.http import JsonResponse
from django.shortcuts import render

from config.build import BUILD, identity
from shop.models import Heartbeat


def healthz(request):
    """Basic health check."""
    return JsonResponse({"status": "ok"})


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
