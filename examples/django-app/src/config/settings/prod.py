"""Production settings: everything sensitive or host-specific comes from env."""

from .base import *  # noqa: F403
from .base import env

DEBUG = False
SECRET_KEY = env("DJANGO_SECRET_KEY")
# Strict: a request whose Host header is not listed gets 400, so health
# checks must send the app's real host name.
ALLOWED_HOSTS = [h.strip() for h in env("DJANGO_ALLOWED_HOSTS").split(",") if h.strip()]

# TLS ends at the proxy in front of the app, which says so in this header.
# Plain HTTP is redirected to HTTPS, health checks included: deployd's check
# sends the header the proxy sets (health.headers in deployd's config), so
# nothing is exempted and `check --deploy --fail-level WARNING` passes.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env("DJANGO_SECURE_SSL_REDIRECT", "true").lower() == "true"
SECURE_HSTS_SECONDS = 31536000
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
