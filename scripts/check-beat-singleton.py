"""Checks `docker events` JSON lines: no two beat containers of one app ran at once.

With --fleet PREFIX, the apps whose names start with PREFIX are the hosts of
one fleet (scripts/scenario/fleet.sh): no two beats among all of them.

scripts/test.sh records the events of every container labelled
deployd.service=beat for the whole suite, then runs this over them. Two
celery beats of one app would send every periodic task twice; deployd
promises that never happens, in deployments and rollbacks alike.
"""

import json
import sys
from collections import defaultdict


def main(path, fleet=None):
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
        # A fleet's hosts run apps named PREFIX + host: one beat among all.
        if fleet and app.startswith(fleet):
            app = fleet
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
    args = sys.argv[1:]
    if args[:1] == ["--fleet"]:
        main(args[2], fleet=args[1])
    else:
        main(args[0])
