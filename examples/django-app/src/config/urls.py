from django.urls import path

from shop.views import healthz, heartbeats, index, readiness

urlpatterns = [
    path("healthz/", healthz),
    path("readiness/", readiness),
    path("heartbeats/", heartbeats),
    path("", index),
]
