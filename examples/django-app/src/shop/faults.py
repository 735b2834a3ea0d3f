"""Fault injection for the broken builds (see config/build.py).

Kept out of the views so that /healthz/ and /readiness/ stay exactly the
reference document's code; good builds pass straight through.
"""

import time

from django.http import JsonResponse

from config.build import BUILD, STARTED_AT


def health_is_broken():
    if BUILD.variant == "healthz-500":
        return True
    return BUILD.variant == "unhealthy-after-5s" and time.monotonic() - STARTED_AT > 5


class BrokenHealthMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path == "/healthz/" and health_is_broken():
            return JsonResponse({"status": "broken", "variant": BUILD.variant}, status=500)
        return self.get_response(request)
