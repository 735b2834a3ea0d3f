"""Hostile and ordinary clients for the edge scenario (scripts/scenario/edge.sh).

  edge_clients.py trickle ADDR HOST --clients N --seconds S
      N clients each POST a JSON body to /echo/, one byte a second for S
      seconds (Content-Length says more is coming). Prints the statuses
      they got, as JSON.
  edge_clients.py check ADDR HOST PATH --seconds S [--clients N]
      N clients GET PATH in a loop for S seconds, a new connection each
      time, 5 s timeout. Prints requests, failures and latency p50/p99.
  edge_clients.py idle ADDR --count N --per-source K --ready FILE --stop FILE
      Opens N connections that send nothing, K from each source address
      127.0.0.2, 127.0.0.3, ...; writes FILE (--ready) once all are tried,
      holds them until FILE (--stop) exists. Prints how many connected and
      how many the server closed meanwhile.
  edge_clients.py flood ADDR --ca CA --count N --path-bytes B [--connections C]
      N unauthenticated PATCH requests to /v1/<B bytes> over TLS, on C
      keep-alive connections. Prints the count of each status.

Standard library only; it raises its own open-file limit.
"""

import argparse
import asyncio
import http.client
import json
import resource
import socket
import ssl
import statistics
import sys
import threading
import time


def raise_open_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


async def trickle_one(addr, host, seconds):
    host_ip, port = split(addr)
    reader, writer = await asyncio.open_connection(host_ip, port)
    body = b"[" + b"1," * (seconds // 2) + b"1]"
    head = (
        f"POST /echo/ HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    writer.write(head)
    await writer.drain()
    status = None
    try:
        for i in range(len(body)):
            writer.write(body[i : i + 1])
            await writer.drain()
            # Has the server answered already (408, or closed)?
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=1.0)
                status = line.decode(errors="replace").split(" ")[1] if line else "closed"
                break
            except asyncio.TimeoutError:
                pass
        if status is None:
            line = await asyncio.wait_for(reader.readline(), timeout=60)
            status = line.decode(errors="replace").split(" ")[1] if line else "closed"
    except (ConnectionError, OSError) as e:
        status = f"error: {type(e).__name__}"
    writer.close()
    return status


async def trickle(args):
    statuses = await asyncio.gather(
        *(trickle_one(args.addr, args.host, args.seconds) for _ in range(args.clients))
    )
    counts = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    print(json.dumps({"trickle_statuses": counts}))


def check(args):
    host_ip, port = split(args.addr)
    deadline = time.monotonic() + args.seconds
    latencies, failures, lock = [], [], threading.Lock()

    def loop():
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                conn = http.client.HTTPConnection(host_ip, port, timeout=5)
                conn.request("GET", args.path, headers={"Host": args.host})
                response = conn.getresponse()
                response.read()
                conn.close()
                ok = response.status == 200
                error = None if ok else f"HTTP {response.status}"
            except Exception as e:  # every failure counts
                ok, error = False, f"{type(e).__name__}: {e}"
            elapsed = time.monotonic() - started
            with lock:
                latencies.append(elapsed)
                if not ok:
                    failures.append(error)
            time.sleep(0.02)

    threads = [threading.Thread(target=loop) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(round((len(latencies) - 1) * p)))]
    print(
        json.dumps(
            {
                "requests": len(latencies),
                "failed": len(failures),
                "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
                "p99_ms": round(pct(0.99) * 1000, 1) if latencies else None,
                "first_failures": failures[:3],
            }
        )
    )


async def idle(args):
    host_ip, port = split(args.addr)
    opened, refused = [], 0
    for i in range(args.count):
        source = f"127.0.{(i // args.per_source) // 250}.{2 + (i // args.per_source) % 250}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            await asyncio.get_running_loop().sock_connect(sock, (host_ip, port))
            opened.append(sock)
        except OSError:
            refused += 1
            sock.close()
    open(args.ready, "w").close()
    # Hold until told to stop; see which the server closed.
    while True:
        try:
            open(args.stop).close()
            break
        except FileNotFoundError:
            await asyncio.sleep(0.2)
    closed = 0
    for sock in opened:
        try:
            if sock.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        sock.close()
    print(json.dumps({"connected": len(opened), "refused": refused, "closed_by_server": closed}))


def flood(args):
    host_ip, port = split(args.addr)
    context = ssl.create_default_context(cafile=args.ca)
    path = "/v1/" + "x" * args.path_bytes
    counts, lock = {}, threading.Lock()
    per = args.count // args.connections

    def loop(n):
        conn = None
        for _ in range(n):
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(
                        "localhost", port, context=context, timeout=30
                    )
                conn.request("PATCH", path, body=b"{}", headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                key = str(response.status)
                if response.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # counted, never fatal
                key = type(e).__name__
                if conn is not None:
                    conn.close()
                conn = None
            with lock:
                counts[key] = counts.get(key, 0) + 1

    threads = [threading.Thread(target=loop, args=(per,)) for _ in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"flood_statuses": counts}))


def main():
    raise_open_files()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("trickle")
    p.add_argument("addr")
    p.add_argument("host")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=int, default=40)
    p = sub.add_parser("check")
    p.add_argument("addr")
    p.add_argument("host")
    p.add_argument("path")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--clients", type=int, default=2)
    p = sub.add_parser("idle")
    p.add_argument("addr")
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--per-source", type=int, default=200)
    p.add_argument("--ready", required=True)
    p.add_argument("--stop", required=True)
    p = sub.add_parser("flood")
    p.add_argument("addr")
    p.add_argument("--ca", required=True)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--path-bytes", type=int, default=60000)
    p.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    if args.command == "trickle":
        asyncio.run(trickle(args))
    elif args.command == "check":
        check(args)
    elif args.command == "idle":
        asyncio.run(idle(args))
    elif args.command == "flood":
        flood(args)


if __name__ == "__main__":
    sys.exit(main())
