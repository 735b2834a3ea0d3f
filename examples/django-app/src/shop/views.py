from django.db import connection
from django.http import JsonResponse
from django.shortcuts import render

from config.build import BUILD, identity
from shop.models import Heartbeat


def healthz(request):
    """Basic health check."""
    return JsonResponse({"status": "ok"})


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
