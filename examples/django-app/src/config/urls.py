from django.urls import path

from shop.views import echo, healthz, heartbeats, index, readiness, release, slow

urlpatterns = [
    path("healthz/", healthz),
    path("readiness/", readiness),
    path("heartbeats/", heartbeats),
    path("release/", release),
    path("slow/", slow),
    path("echo/", echo),
    path("", index),
]
