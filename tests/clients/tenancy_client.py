#!/usr/bin/env python3
"""Drives an authenticated Cordon with the official MCP Python SDK.

Run by tests/tenancy.rs with the venv of scripts/install-python-deps. It
reads a JSON spec and prints one JSON line per principal:

  spec:   {"url": "...", "transport": "streamable" | "sse", "ca": "ca.pem" | null,
           "principals": [{"label": "...", "token": "..."}],
           "calls": [{"tool": "...", "arguments": {...}}]}
  output: {"label": "...", "tools": [names], "calls": {tool: {"ok": bool,
           "is_error": bool, "code": int | null, "message": str | null}}}

Every principal connects with `Authorization: Bearer <token>`, lists the
tools (all pages) and makes every call. Errors are reported, not raised:
the Rust test decides what is expected.
"""

from __future__ import annotations

import json
import ssl
import sys
from typing import Any

import anyio
import httpx2
from mcp import Client, MCPError
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

CALL_TIMEOUT = 30.0


def http_client(token: str, ca: str | None) -> httpx2.AsyncClient:
    verify: Any = ssl.create_default_context(cafile=ca) if ca else True
    return httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        verify=verify,
        timeout=httpx2.Timeout(30.0, read=300.0),
    )


async def run_principal(spec: dict[str, Any], principal: dict[str, Any]) -> dict[str, Any]:
    token = principal["token"]
    if spec["transport"] == "sse":
        ca = spec.get("ca")

        def factory(headers=None, timeout=None, auth=None):  # noqa: ANN001
            return http_client(token, ca)

        transport = sse_client(spec["url"], httpx_client_factory=factory)
        client = Client(transport, mode="legacy")
    else:
        transport = streamable_http_client(spec["url"], http_client=http_client(token, spec.get("ca")))
        client = Client(transport, mode="legacy")
    out: dict[str, Any] = {"label": principal["label"], "tools": [], "calls": {}}
    async with client:
        cursor = None
        for _ in range(100):
            page = await client.list_tools(cursor=cursor)
            out["tools"] += [t.name for t in page.tools]
            cursor = page.next_cursor
            if cursor is None:
                break
        for call in spec["calls"]:
            entry: dict[str, Any] = {"ok": False, "is_error": False, "code": None, "message": None}
            try:
                result = await client.call_tool(
                    call["tool"], call.get("arguments", {}), read_timeout_seconds=CALL_TIMEOUT
                )
                entry["ok"] = not result.is_error
                entry["is_error"] = bool(result.is_error)
                entry["message"] = "\n".join(getattr(b, "text", "") for b in result.content)
            except MCPError as e:
                entry["code"] = e.error.code
                entry["message"] = e.error.message
            out["calls"][call["tool"]] = entry
    return out


async def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    for principal in spec["principals"]:
        print(json.dumps(await run_principal(spec, principal)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
