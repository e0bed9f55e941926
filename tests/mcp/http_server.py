"""An MCP server on the Streamable HTTP transport, built on the official MCP Python SDK's
`MCPServer`, for the real-software tests and the demo: `fetch` GETs a URL and says what
it got (as a fetch tool of an SSRF-prone server would), `echo` returns its text,
`/healthz` answers a kubelet-style probe.

    http_server.py HOST PORT [json]

With `json` the server answers POSTs with `application/json` bodies instead of SSE
streams.
"""

import sys
import urllib.request

from mcp.server.mcpserver import MCPServer
from starlette.requests import Request
from starlette.responses import PlainTextResponse

host, port = sys.argv[1], int(sys.argv[2])
json_response = len(sys.argv) > 3 and sys.argv[3] == "json"
server = MCPServer("test-http")


@server.tool()
def fetch(url: str) -> str:
    """Fetches a URL."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return f"{r.status} {r.read(200).decode(errors='replace')}"
    except Exception as e:  # the test reads what the server saw
        reason = getattr(e, "reason", e)
        return f"refused: {getattr(reason, 'strerror', None) or reason}"


@server.tool()
def echo(text: str) -> str:
    """Returns its text."""
    return text


@server.custom_route("/healthz", methods=["GET"])
async def healthz(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


server.run(transport="streamable-http", host=host, port=port, json_response=json_response)
