"""Holds a listening socket and runs a program with it, as systemd's
deployd.socket does: the program gets it as fd 3 with LISTEN_FDS=1 and
LISTEN_PID set to its own pid. On SIGHUP the program is sent SIGTERM,
waited for, and started again on the same socket: connections that arrive
in between wait in the socket's queue instead of being refused. SIGTERM
stops the program and exits.

With --notify LOG it also plays systemd's notification socket: it sets
NOTIFY_SOCKET (and, with --watchdog-usec, WATCHDOG_USEC and WATCHDOG_PID)
and appends each message the program sends to LOG, one per line. With
--ready-probe HOST:PORT, each READY=1 is followed at once by a TCP connect
to that address, logged as PROBE=ok or PROBE=<error>: a service must not
say it is ready before it listens.

  socket_holder.py HOST:PORT [--notify LOG [--watchdog-usec N]
                   [--ready-probe HOST:PORT]] -- PROGRAM [ARGS...]
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading


def split_address(address):
    host, port = address.rsplit(":", 1)
    return host, int(port)


def notifications(log_path, probe):
    """Binds a datagram socket like systemd's and logs what arrives."""
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)

    def receive():
        while True:
            message = receiver.recv(4096).decode()
            lines = message.splitlines()
            if probe and "READY=1" in lines:
                try:
                    socket.create_connection(split_address(probe), timeout=1).close()
                    lines.append("PROBE=ok")
                except OSError as e:
                    lines.append(f"PROBE={e}")
            with open(log_path, "a") as log:
                log.write("".join(f"{line}\n" for line in lines))

    threading.Thread(target=receive, daemon=True).start()
    return path


def main():
    args = sys.argv[1:]
    split = args.index("--")
    options, program = args[1:split], args[split + 1 :]
    options = dict(zip(options[::2], options[1::2]))
    address = args[0]
    host, port = split_address(address)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    os.dup2(listener.fileno(), 3, inheritable=True)
    # Only now: the notification socket must not take fd 3.
    extra = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "public"}
    pids = "LISTEN_PID=$$"
    if "--notify" in options:
        extra["NOTIFY_SOCKET"] = notifications(
            options["--notify"], options.get("--ready-probe")
        )
        if "--watchdog-usec" in options:
            extra["WATCHDOG_USEC"] = options["--watchdog-usec"]
            pids += " WATCHDOG_PID=$$"

    def start():
        # LISTEN_PID must be the program's pid: the shell execs into it.
        return subprocess.Popen(
            ["sh", "-c", f'{pids} exec "$@"', "sh", *program],
            env={**os.environ, **extra},
            pass_fds=(3,),
        )

    child = [start()]
    restart = threading.Event()
    done = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: restart.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    while not done.is_set():
        if restart.wait(0.2):
            restart.clear()
            child[0].terminate()
            child[0].wait()
            child[0] = start()
        elif child[0].poll() is not None:
            sys.exit(child[0].returncode)
    child[0].terminate()
    child[0].wait()


if __name__ == "__main__":
    main()
