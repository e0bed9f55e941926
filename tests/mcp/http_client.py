"""An MCP client on the Streamable HTTP transport, built on the official MCP Python SDK:
connects to URL, initializes, lists the tools, makes the calls given as JSON and prints
one JSON object with what it got (a call answered with a JSON-RPC error: its `error`
and `code`). Any other failure of the client itself exits non-zero.

    http_client.py URL --calls '[["fetch", {"url": "http://198.51.100.7/"}]]'
"""

import argparse
import json

import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--calls", default="[]")
    a = ap.parse_args()
    out = {"results": []}
    async with streamable_http_client(a.url) as streams:
        r, w = streams[0], streams[1]
        async with ClientSession(r, w) as s:
            init = await s.initialize()
            info = getattr(init, "server_info", None) or getattr(init, "serverInfo")
            out["server"] = info.name
            out["tools"] = [t.name for t in (await s.list_tools()).tools]
            for tool, args in json.loads(a.calls):
                try:
                    res = await s.call_tool(tool, args)
                except MCPError as e:  # a relay's refusal
                    out["results"].append({"tool": tool, "error": e.message, "code": e.code})
                    continue
                is_error = getattr(res, "is_error", None)
                if is_error is None:
                    is_error = getattr(res, "isError", False)
                out["results"].append(
                    {"tool": tool, "is_error": bool(is_error), "text": text_of(res)[:2000]}
                )
    print(json.dumps(out))


anyio.run(main)
