"""An MCP client built on the official MCP Python SDK (`mcp` from PyPI), for the tests
and the demo: starts a stdio server (the command after `--`), initializes, lists the
tools, makes the calls given as JSON, and prints one JSON object with what it got.

    client.py --calls '[["fetch", {"url": "http://198.51.100.7/"}]]' -- SERVER ARGS...

--concurrent makes the calls at once; --hold N keeps the session open N seconds after
the last call (for background work of the server); --relist lists the tools again after
that (`tools_after`); --progress asks for progress notifications and keeps their
messages (`progress`); --then makes more calls, one after the other, after that. A call
answered with a JSON-RPC error (a relay's refusal) is recorded with its `error` and
`code`. Any other failure of the client itself
exits non-zero, so a test cannot mistake it for a refused connection.
"""

import argparse
import json
import sys

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", default="[]")
    ap.add_argument("--concurrent", action="store_true")
    ap.add_argument("--hold", type=float, default=0)
    ap.add_argument("--then", default="[]")
    ap.add_argument("--relist", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("server", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    server = a.server[1:] if a.server and a.server[0] == "--" else a.server
    calls = json.loads(a.calls)
    then = json.loads(a.then)
    params = StdioServerParameters(command=server[0], args=server[1:])
    out = {"results": [None] * (len(calls) + len(then))}
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            init = await s.initialize()
            out["server"] = init.server_info.name if hasattr(init, "server_info") else init.serverInfo.name
            out["tools"] = [t.name for t in (await s.list_tools()).tools]

            out["progress"] = []

            async def on_progress(progress, total, message):
                out["progress"].append(message)

            async def one(i, tool, args):
                try:
                    if a.progress:
                        res = await s.call_tool(tool, args, progress_callback=on_progress)
                    else:
                        res = await s.call_tool(tool, args)
                except MCPError as e:
                    out["results"][i] = {"tool": tool, "error": e.message, "code": e.code}
                    return
                is_error = getattr(res, "is_error", None)
                if is_error is None:
                    is_error = getattr(res, "isError", False)
                out["results"][i] = {"tool": tool, "is_error": bool(is_error), "text": text_of(res)[:2000]}

            if a.concurrent:
                async with anyio.create_task_group() as tg:
                    for i, (tool, args) in enumerate(calls):
                        tg.start_soon(one, i, tool, args)
            else:
                for i, (tool, args) in enumerate(calls):
                    await one(i, tool, args)
            if a.hold:
                await anyio.sleep(a.hold)
            if a.relist:
                out["tools_after"] = [t.name for t in (await s.list_tools()).tools]
            for i, (tool, args) in enumerate(then):
                await one(len(calls) + i, tool, args)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


anyio.run(main)
