#!/usr/bin/env python3
"""Drives a running Cordon with the official MCP Python SDK (PyPI `mcp`).

Run by tests/python_sdk.rs with the venv that scripts/install-python-deps
makes (.ci/cache/python/bin/python). One line per check on stdout, `ok: ...`
or `FAIL: ...`; the exit status is 0 only when every check passed.

Transports:
  streamable-legacy  Streamable HTTP with the initialize handshake and a session
                     (Client(url, mode="legacy")); TARGET is the /mcp URL.
  streamable-auto    Streamable HTTP, mode="auto": probes `server/discover` and
                     adopts 2026-07-28 (stateless) when the server offers it;
                     TARGET is the /mcp URL. --expect-protocol pins the outcome.
  sse                the classic HTTP+SSE transport (mcp.client.sse.sse_client);
                     TARGET is the /sse URL.
  stdio              spawns TARGET... (e.g. `cordon stdio --config F --tenant t1`)
                     and talks over its stdin/stdout (StdioServerParameters).

Examples:
  python_sdk_client.py --transport streamable-legacy http://127.0.0.1:8750/mcp
  python_sdk_client.py --transport stdio -- cordon stdio --config cordon.toml --tenant t1
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any

import anyio
import mcp
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.sse import sse_client

# How long one call may take before the client gives up (seconds): generous,
# so that a hung server fails the check instead of hanging the test.
CALL_TIMEOUT = 20.0


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def ok(self, what: str) -> None:
        print(f"ok: {what}", flush=True)

    def fail(self, what: str) -> None:
        print(f"FAIL: {what}", flush=True)
        self.failed.append(what)

    def check(self, cond: bool, what: str, detail: Any = "") -> bool:
        if cond:
            self.ok(what)
        else:
            self.fail(f"{what}{f' ({detail})' if detail != '' else ''}")
        return cond


def make_client(args: argparse.Namespace) -> Client:
    target: list[str] = args.target
    if args.transport == "stdio":
        params = StdioServerParameters(command=target[0], args=target[1:])
        return Client(params, mode="legacy")
    if len(target) != 1:
        raise SystemExit(f"--transport {args.transport} takes exactly one URL, got {target}")
    url = target[0]
    if args.transport == "streamable-legacy":
        return Client(url, mode="legacy")
    if args.transport == "streamable-auto":
        return Client(url, mode="auto")
    if args.transport == "sse":
        return Client(sse_client(url), mode="legacy")
    raise SystemExit(f"unknown transport {args.transport}")


def text_of(result: mcp.types.CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


async def call_with_progress(
    client: Client, tool: str, arguments: dict[str, Any], timeout: float
) -> tuple[mcp.types.CallToolResult, list[tuple[float, float | None, str | None]]]:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        print(f"  progress: {progress}/{total} {message or ''}", flush=True)
        seen.append((progress, total, message))

    result = await client.call_tool(
        tool, arguments, read_timeout_seconds=timeout, progress_callback=on_progress
    )
    return result, seen


async def run(args: argparse.Namespace, checks: Checks) -> None:
    async with make_client(args) as client:
        info = client.server_info
        checks.ok(
            f"connected over {args.transport}: protocol {client.protocol_version}, "
            f"server {info.name if info else '?'} {info.version if info else ''}".rstrip()
        )
        if args.expect_protocol:
            checks.check(
                client.protocol_version == args.expect_protocol,
                f"negotiated protocol is {args.expect_protocol}",
                f"got {client.protocol_version}",
            )

        # tools/list (every page).
        names: list[str] = []
        cursor: str | None = None
        for _ in range(100):
            page = await client.list_tools(cursor=cursor)
            names += [t.name for t in page.tools]
            cursor = page.next_cursor
            if cursor is None:
                break
        for wanted in ("text_stats", "test_simple_text"):
            checks.check(wanted in names, f"tools/list has {wanted}", f"listed: {names}")

        # A structured result.
        result = await client.call_tool(
            "text_stats", {"text": "three little words"}, read_timeout_seconds=CALL_TIMEOUT
        )
        checks.check(not result.is_error, "text_stats succeeded", text_of(result))
        structured = result.structured_content or {}
        checks.check(
            structured.get("words") == 3,
            "text_stats structuredContent.words == 3",
            f"structuredContent: {result.structured_content}",
        )

        # Progress notifications, delivered to the call's callback in order.
        result, seen = await call_with_progress(client, "test_tool_with_progress", {}, CALL_TIMEOUT)
        checks.check(not result.is_error, "test_tool_with_progress succeeded", text_of(result))
        values = [p for p, _, _ in seen]
        checks.check(
            values == [0, 50, 100],
            "test_tool_with_progress sent progress 0, 50, 100 in order",
            f"got {values}",
        )
        checks.check(
            all(total == 100 for _, total, _ in seen) and bool(seen),
            "progress carries total 100",
            f"got {seen}",
        )

        # An unknown tool: a JSON-RPC error or an isError result are both errors.
        try:
            result = await client.call_tool(
                "no_such_tool_xyz", {}, read_timeout_seconds=CALL_TIMEOUT
            )
        except MCPError as e:
            checks.ok(f"unknown tool is an error: JSON-RPC {e.code} {e.error.message}")
        else:
            checks.check(
                bool(result.is_error),
                "unknown tool is an error (isError result)",
                f"got a successful result: {text_of(result)}",
            )

        # A tool error is a result with isError, not a protocol error.
        try:
            result = await client.call_tool("test_error_handling", {}, read_timeout_seconds=CALL_TIMEOUT)
        except MCPError as e:
            checks.fail(f"test_error_handling raised JSON-RPC error {e.code} {e.error.message}, expected isError")
        else:
            checks.check(
                bool(result.is_error) and "intentionally" in text_of(result),
                "test_error_handling returns isError with its message",
                f"is_error={result.is_error} text={text_of(result)!r}",
            )

        # A long call that keeps reporting progress is not cut off.
        if args.long_ms:
            ms = args.long_ms
            start = time.monotonic()
            result, seen = await call_with_progress(
                client, "sleep_ms", {"ms": ms}, timeout=ms / 1000 + 30
            )
            elapsed = time.monotonic() - start
            checks.check(
                not result.is_error and text_of(result) == f"Slept {ms} ms.",
                f"sleep_ms {ms} completed after {elapsed:.1f}s",
                text_of(result),
            )
            checks.check(elapsed >= ms / 1000 - 0.5, "sleep_ms really took its time", f"{elapsed:.1f}s")
            values = [p for p, _, _ in seen]
            # One at the start, then one a second.
            expected = ms // 1000
            checks.check(
                len(values) >= expected,
                f"sleep_ms sent at least {expected} progress notifications",
                f"got {len(values)}: {values}",
            )
            checks.check(
                all(a < b for a, b in zip(values, values[1:])),
                "sleep_ms progress increases",
                f"got {values}",
            )
            checks.check(bool(values) and values[-1] == ms, f"sleep_ms progress reached {ms}", f"got {values}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--transport", required=True, choices=["sse", "streamable-legacy", "streamable-auto", "stdio"]
    )
    parser.add_argument(
        "--expect-protocol", help="fail unless this protocol version is negotiated (e.g. 2026-07-28)"
    )
    parser.add_argument(
        "--long-ms", type=int, default=0, help="also call sleep_ms for this long and check its progress"
    )
    parser.add_argument("target", nargs="+", help="the URL, or for stdio the command and its arguments")
    args = parser.parse_args()

    from importlib.metadata import version

    print(f"mcp (Python SDK) {version('mcp')}, transport {args.transport}", flush=True)
    checks = Checks()
    try:
        anyio.run(run, args, checks)
    except BaseException as e:  # noqa: BLE001 - report any failure as a check
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc()
        checks.fail(f"unexpected exception: {type(e).__name__}: {e}")
    if checks.failed:
        print(f"{len(checks.failed)} check(s) failed", flush=True)
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
