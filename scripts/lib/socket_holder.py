"""Holds a listening socket and runs a program with it, as systemd's
deployd.socket does: the program gets it as fd 3 with LISTEN_FDS=1 and
LISTEN_PID set to its own pid. On SIGHUP the program is sent SIGTERM,
waited for, and started again on the same socket: connections that arrive
in between wait in the socket's queue instead of being refused. SIGTERM
stops the program and exits.

  socket_holder.py HOST:PORT -- PROGRAM [ARGS...]
"""

import os
import signal
import socket
import subprocess
import sys
import threading


def main():
    address, program = sys.argv[1], sys.argv[3:]
    host, port = address.rsplit(":", 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(1024)
    os.dup2(listener.fileno(), 3, inheritable=True)

    def start():
        # LISTEN_PID must be the program's pid: the shell execs into it.
        return subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *program],
            env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "public"},
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
