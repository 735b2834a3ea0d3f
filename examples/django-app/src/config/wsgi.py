"""WSGI entry point for gunicorn."""

import os
import time

from django.core.wsgi import get_wsgi_application

from config.build import BUILD

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.prod")

if BUILD.variant == "web-crash":
    raise RuntimeError("web-crash build: refusing to start")
if BUILD.variant == "slow-boot":
    # A slow import (a big model, a cold cache): no request is served until
    # it is done.
    time.sleep(float(os.environ.get("SHOP_SLOW_BOOT_SECONDS", "20")))

application = get_wsgi_application()
