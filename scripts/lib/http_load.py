"""Continuous HTTP load for the availability scenario, and its report.

  http_load.py run URL HOST OUT.ndjson STOPFILE [--keep-alive N] [--fresh N]
                   [--users N] [--pause MS]
      Clients loop on GET URL until STOPFILE exists: N keep-alive clients
      (one connection, reused; reopened only when the server closes it
      cleanly) and N clients opening a new connection per request. Each
      request is one JSON line: start, end, ok, status or error, and the
      release that served it (the `served_by` of the sample app, host
      part dropped). Sends X-Forwarded-Proto: https as the TLS terminator
      in front of a real site would; with --users N, also the
      X-Forwarded-For of one of N users picked at random per request, so
      a switch that trusts it splits them as it would a site's visitors.
      With --pause MS, each client waits MS milliseconds after each
      request: a steady load that leaves the machine to the deployments.
  http_load.py report OUT.ndjson PHASES.tsv
      Requests and failures per phase (PHASES: name, start, end in epoch
      seconds), and which releases served each phase, as JSON.
  http_load.py compare DEPLOYD.json REFERENCE.json
      Both reports side by side; exits 1 if the first failed any request.
  http_load.py table NAME REPORT.json
      One report as a table.

Standard library only: it runs on any host with Python 3.
"""

import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.parse


def client(url, host, out, lock, stop, keep_alive, users, pause):
    parts = urllib.parse.urlsplit(url)
    conn = None
    while not os.path.exists(stop):
        started = time.time()
        record = {"start": started, "keep_alive": keep_alive}
        headers = {"Host": host, "X-Forwarded-Proto": "https"}
        if users:
            user = random.randrange(users)
            headers["X-Forwarded-For"] = f"10.{user >> 16 & 255}.{user >> 8 & 255}.{user & 255}"
        try:
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            conn.request("GET", parts.path or "/", headers=headers)
            response = conn.getresponse()
            body = response.read()
            record["status"] = response.status
            record["ok"] = response.status == 200
            if record["ok"]:
                served = json.loads(body).get("served_by", "")
                record["release"] = served.split("@")[0]
            else:
                # Who refused: the switch, a load balancer in front of it, the app.
                record["body"] = body[:100].decode(errors="replace").strip()
            if not keep_alive or response.will_close:
                conn.close()
                conn = None
        except Exception as e:  # every failure counts; none stops the client
            record["ok"] = False
            record["error"] = f"{type(e).__name__}: {e}"
            if conn is not None:
                conn.close()
            conn = None
        record["end"] = time.time()
        with lock:
            out.write(json.dumps(record) + "\n")
        if pause:
            time.sleep(pause)


def run(args):
    url, host, path, stop = args[:4]
    counts = {"--keep-alive": 2, "--fresh": 2, "--users": 0, "--pause": 0}
    rest = args[4:]
    for i in range(0, len(rest), 2):
        counts[rest[i]] = int(rest[i + 1])
    lock = threading.Lock()
    with open(path, "w", buffering=1) as out:
        threads = [
            threading.Thread(
                target=client,
                args=(url, host, out, lock, stop, keep_alive, counts["--users"], counts["--pause"] / 1000),
            )
            for keep_alive, n in ((True, counts["--keep-alive"]), (False, counts["--fresh"]))
            for _ in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def report(args):
    path, phases_path = args
    records = [json.loads(line) for line in open(path)]
    phases = []
    for line in open(phases_path):
        name, start, end = line.rstrip("\n").split("\t")
        phases.append((name, float(start), float(end)))
    rows = []
    for name, start, end in phases:
        inside = [r for r in records if start <= r["start"] < end]
        failed = [r for r in inside if not r["ok"]]
        errors = sorted({r.get("error") or f"HTTP {r.get('status')}: {r.get('body', '')}" for r in failed})
        served = {}
        for r in inside:
            if r["ok"]:
                served[r["release"]] = served.get(r["release"], 0) + 1
        rows.append(
            {
                "phase": name,
                "seconds": round(end - start, 1),
                "requests": len(inside),
                "failed": len(failed),
                "served": served,
                # When they failed, in seconds from the phase's start: one
                # burst or spread over the phase.
                "failing": [round(min(r["start"] for r in failed) - start, 1), round(max(r["start"] for r in failed) - start, 1)]
                if failed
                else [],
                "errors": errors[:5],
            }
        )
    total = {
        "requests": len(records),
        "failed": sum(not r["ok"] for r in records),
    }
    json.dump({"phases": rows, "total": total}, sys.stdout)
    print()


def print_side(name, path):
    """One report as a table; returns its failed requests."""
    result = json.load(open(path))
    print(f"\n{name}")
    print(f"  {'phase':40} {'s':>6} {'requests':>9} {'failed':>7}  served by")
    for p in result["phases"]:
        served = ", ".join(f"{k}: {v}" for k, v in sorted(p["served"].items()))
        print(f"  {p['phase']:40} {p['seconds']:>6} {p['requests']:>9} {p['failed']:>7}  {served}")
        if p["failing"]:
            first, last = p["failing"]
            print(f"  {'':66}! failing from {first} s to {last} s into the phase")
        for error in p["errors"]:
            print(f"  {'':66}! {error}")
    total = result["total"]
    print(f"  {'whole run':40} {'':>6} {total['requests']:>9} {total['failed']:>7}")
    return total["failed"]


def compare(args):
    failed = print_side("deployd", args[0])
    print_side("reference deploy.sh + docker-compose", args[1])
    sys.exit(1 if failed else 0)


def table(args):
    print_side(args[0], args[1])


if __name__ == "__main__":
    {"run": run, "report": report, "compare": compare, "table": table}[sys.argv[1]](sys.argv[2:])
