"""Schemathesis hooks for scripts/api/fuzz.sh: a fresh token per request.

deployd spends a token's id (jti) on the first change it makes, so a shared
token would turn every later change into a 401. Each request gets its own,
signed by `deployd token issue` with the configuration under test.
"""

import os
import subprocess

import schemathesis


@schemathesis.auth(refresh_interval=None)
class FreshToken:
    def get(self, case, ctx):
        return subprocess.run(
            [
                os.environ["DEPLOYD_BIN"],
                "token",
                "issue",
                "--config",
                os.environ["DEPLOYD_CONFIG"],
                "--sub",
                "schemathesis",
                "--scope",
                "read,deploy,rollback,admin,run,logs",
                "--ttl",
                "10m",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def set(self, case, data, ctx):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"
