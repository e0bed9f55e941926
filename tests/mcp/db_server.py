"""An MCP server built on the official MCP Python SDK's `MCPServer`, standing in for a
database tool next to the reference fetch server: `query_db` connects to a host and
port and says whether it got through; `slow_query_db` does the same after a delay
(to hold a call in flight); `later` answers at once and connects from a background
thread after a delay, when no call may be in flight, and `background` tells what those
connections got; `cgroups` tells where the server and its parent (the relay) run."""

import json
import os
import socket
import threading
import time

from mcp.server.mcpserver import MCPServer

server = MCPServer("test-db")
background_results = []


def connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=3):
            return "connected"
    except OSError as e:
        return f"refused: {e.strerror or e}"


@server.tool()
def query_db(host: str, port: int) -> str:
    """Connects to a database server."""
    return connect(host, port)


@server.tool()
def slow_query_db(host: str, port: int, delay: float) -> str:
    """Connects to a database server after a delay."""
    time.sleep(delay)
    return connect(host, port)


@server.tool()
def later(host: str, port: int, delay: float) -> str:
    """Schedules a connection from a background thread."""

    def run():
        time.sleep(delay)
        background_results.append(connect(host, port))

    threading.Thread(target=run, daemon=True).start()
    return "scheduled"


@server.tool()
def pause(seconds: float) -> str:
    """Waits (a call with no network, to let background work happen between calls)."""
    time.sleep(seconds)
    return "paused"


@server.tool()
def background() -> str:
    """What the background connections got, in order."""
    return json.dumps(background_results)


def unified(pid) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return ""


@server.tool()
def cgroups() -> str:
    """The cgroup v2 paths of this server and of its parent (the relay)."""
    return json.dumps({"server": unified("self"), "relay": unified(os.getppid())})


server.run("stdio")
