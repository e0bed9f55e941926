"""Speaks the daemon's MCP socket protocol by hand, as a process that is not a relay of
ours would: connects to SOCKET, sends each LINE (a JSON object), and writes one JSON
object per line to OUT: the daemon's reply, or {"error": ...} when the connection failed.

    raw_report.py SOCKET OUT LINE...
"""

import json
import socket
import sys
import time

sock_path, out_path, lines = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out_path, "w") as out:
    try:
        # The kernel lets a pod's sidecar container reach the socket once the daemon's
        # runtime poll has placed it (a fraction of a second after it starts).
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(sock_path)
                break
            except PermissionError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        f = s.makefile("rwb")
        for line in lines:
            f.write(line.encode() + b"\n")
            f.flush()
            out.write(f.readline().decode().strip() + "\n")
    except OSError as e:
        out.write(json.dumps({"error": str(e), "errno": e.errno}) + "\n")
