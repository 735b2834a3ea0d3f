"""Checks `docker events` JSON lines: no two beat containers of one app ran at once.

scripts/test.sh records the events of every container labelled
deployd.service=beat for the whole suite, then runs this over them. Two
celery beats of one app would send every periodic task twice; deployd
promises that never happens, in deployments and rollbacks alike.
"""

import json
import sys
from collections import defaultdict


def main(path):
    running = defaultdict(set)
    starts = 0
    with open(path, encoding="utf-8") as f:
        events = [json.loads(line) for line in f if line.strip()]
    events.sort(key=lambda e: e.get("timeNano", 0))
    for event in events:
        attrs = event.get("Actor", {}).get("Attributes", {})
        app, container = attrs.get("deployd.app"), event.get("id", "")[:12]
        if not app:
            continue
        action = event.get("Action") or event.get("status")
        if action == "start":
            starts += 1
            running[app].add(container)
            if len(running[app]) > 1:
                sys.exit(f"beat singleton violated for app {app}: {sorted(running[app])} running at once")
        elif action in ("die", "destroy"):
            running[app].discard(container)
    print(f"beat singleton held: {starts} beat starts across {len(running)} apps, never two at once")


if __name__ == "__main__":
    main(sys.argv[1])
