"""A fault-injecting HTTP proxy between a client and an OpenAI-compatible server.

It forwards ``POST …/completions`` requests and, at set rates (drawn from a seeded generator in
arrival order), answers with the faults real APIs produce:

| fault | what the client sees | forwarded? |
|---|---|---|
| ``rate_limit`` | HTTP 429 with ``Retry-After: retry_after_s`` | no |
| ``server_error`` | HTTP 500 | no |
| ``stall`` | the answer arrives ``stall_s`` late (past the client's timeout) | yes: tokens spent |
| ``truncate`` | a 200 whose JSON body is cut in half | yes: tokens spent |
| ``reset`` | the connection is reset (TCP RST), no answer | yes: tokens spent |

Other requests (``/health``, ``/v1/models``) pass untouched. Every request is logged as a JSON
line (arrival number, time, path, the client's ``Idempotency-Key``, a hash of the body for
clients that send no key, the fault, the upstream status and answer id), which is how tests and ``bench/api_teacher.py`` count re-sent requests and
check the client's ledger against the server's usage.

Run it with ``python -m distil.remote.faults --upstream 127.0.0.1:8765 --port 8766 --rate-limit
0.1 --server-error 0.05 --stall 0.02 --truncate 0.01 --reset 0.01 --log faults.jsonl``.
It speaks just enough HTTP/1.1 for JSON APIs (Content-Length or chunked bodies, keep-alive).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FAULTS = ("rate_limit", "server_error", "stall", "truncate", "reset")


@dataclass(frozen=True)
class FaultRates:
    """Probabilities of each fault per completion request (their sum at most 1)."""

    rate_limit: float = 0.0
    server_error: float = 0.0
    stall: float = 0.0
    truncate: float = 0.0
    reset: float = 0.0
    retry_after_s: float = 1.0
    stall_s: float = 5.0
    latency_s: float = 0.0  # added to every forwarded completion request (network latency)

    def __post_init__(self) -> None:
        total = sum(getattr(self, f) for f in FAULTS)
        if any(getattr(self, f) < 0 for f in FAULTS) or total > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to at most 1, got {total}")

    def draw(self, u: float) -> str | None:
        """The fault for a uniform draw ``u`` in [0, 1), or None."""
        edge = 0.0
        for fault in FAULTS:
            edge += getattr(self, fault)
            if u < edge:
                return fault
        return None


@dataclass
class _Message:
    head: bytes  # start line + headers, without the blank line
    headers: dict[str, str]
    body: bytes


async def _read_message(reader: asyncio.StreamReader) -> _Message | None:
    """One HTTP/1.1 message; None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].split(b"\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            body += chunk[:-2]
            if size == 0:
                break
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
    return _Message(head[:-4], headers, body)


def _with_headers(msg: _Message, replace: dict[str, str]) -> bytes:
    """The message re-serialised with some headers replaced, Content-Length set, no chunking."""
    lines = msg.head.split(b"\r\n")
    keep = [
        line
        for line in lines[1:]
        if line.split(b":")[0].strip().lower().decode("latin-1")
        not in {*replace, "content-length", "transfer-encoding"}
    ]
    extra = [f"{k}: {v}".encode("latin-1") for k, v in replace.items()]
    length = f"content-length: {len(msg.body)}".encode()
    return b"\r\n".join([lines[0], *keep, *extra, length]) + b"\r\n\r\n" + msg.body


def _json_response(
    status: int, reason: str, body: dict[str, Any], headers: dict[str, str]
) -> bytes:
    data = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append(f"content-length: {len(data)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data


class FaultProxy:
    """The proxy (see the module docstring).

    Args:
        upstream: ``host:port`` of the server.
        rates: Fault probabilities and timings.
        seed: Seeds the fault draws (in arrival order).
        log: JSONL file to append one line per request to (None: no log).
    """

    def __init__(
        self, upstream: str, rates: FaultRates, *, seed: int = 0, log: Path | None = None
    ) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host or "127.0.0.1", int(port))
        self.rates = rates
        self.rng = random.Random(seed)
        self.log = log
        self.count = 0

    def _write_log(self, entry: dict[str, Any]) -> None:
        entry["answered"] = time.time()  # the upstream answer (or the injected fault) is ready
        if self.log is not None:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    async def _forward(self, request: _Message) -> _Message:
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            writer.write(_with_headers(request, {"connection": "close"}))
            await writer.drain()
            response = await _read_message(reader)
        finally:
            writer.close()
        if response is None:
            raise ConnectionError("the upstream closed without an answer")
        return response

    async def _forward_unless_gone(
        self, request: _Message, reader: asyncio.StreamReader
    ) -> _Message | None:
        """Forward, but drop the upstream connection if the client closes first (its timeout), so
        the server sees the disconnect as it would without a proxy. Clients do not pipeline, so
        any byte (or EOF) from the client before the answer means it is gone."""
        forward = asyncio.ensure_future(self._forward(request))
        gone = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait({forward, gone}, return_when=asyncio.FIRST_COMPLETED)
        if forward in done:
            gone.cancel()
            return forward.result()
        forward.cancel()
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection (keep-alive: many requests)."""
        try:
            while (request := await _read_message(reader)) is not None:
                start = request.head.split(b"\r\n")[0].decode("latin-1").split(" ")
                method, path = start[0], start[1] if len(start) > 1 else ""
                faultable = method == "POST" and path.rstrip("/").endswith("completions")
                fault = self.rates.draw(self.rng.random()) if faultable else None
                self.count += 1
                entry: dict[str, Any] = {
                    "n": self.count,
                    "time": time.time(),
                    "path": path,
                    "key": request.headers.get("idempotency-key"),
                    "body_sha": hashlib.sha256(request.body).hexdigest()[:16]
                    if faultable
                    else None,
                    "fault": fault,
                }
                if fault == "rate_limit":
                    retry = self.rates.retry_after_s
                    body: dict[str, Any] = {
                        "error": {
                            "message": "Rate limit reached",
                            "type": "requests",
                            "code": "rate_limit_exceeded",
                        }
                    }
                    writer.write(
                        _json_response(
                            429, "Too Many Requests", body, {"retry-after": f"{retry:g}"}
                        )
                    )
                    await writer.drain()
                    self._write_log(entry)
                    continue
                if fault == "server_error":
                    body = {
                        "error": {
                            "message": "The server had an error",
                            "type": "server_error",
                            "code": None,
                        }
                    }
                    writer.write(_json_response(500, "Internal Server Error", body, {}))
                    await writer.drain()
                    self._write_log(entry)
                    continue
                if faultable and self.rates.latency_s > 0:
                    await asyncio.sleep(self.rates.latency_s)
                response = await self._forward_unless_gone(request, reader)
                if response is None:  # the client went away first: so does the upstream request
                    entry["fault"] = entry["fault"] or "client_gone"
                    self._write_log(entry)
                    return
                entry["status"] = int(response.head.split(b" ")[1])
                try:
                    entry["id"] = json.loads(response.body).get("id")
                except (json.JSONDecodeError, AttributeError):
                    entry["id"] = None
                self._write_log(entry)
                if fault == "reset":
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    writer.transport.abort()
                    return
                if fault == "truncate":
                    response = _Message(
                        response.head, response.headers, response.body[: len(response.body) // 2]
                    )
                if fault == "stall":
                    await asyncio.sleep(self.rates.stall_s)
                writer.write(_with_headers(response, {}))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            logger.debug("client connection ended: %s", exc)
        finally:
            if not writer.transport.is_closing():
                writer.close()

    async def serve(self, port: int, *, host: str = "127.0.0.1") -> None:
        """Listen on ``host:port`` until cancelled."""
        server = await asyncio.start_server(self.handle, host, port)
        logger.warning(
            "fault proxy on http://%s:%d -> %s:%d (%s)", host, port, *self.upstream, self.rates
        )
        async with server:
            await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """``python -m distil.remote.faults``: run the proxy until killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="host:port of the server")
    parser.add_argument("--port", type=int, required=True)
    for fault in FAULTS:
        parser.add_argument(f"--{fault.replace('_', '-')}", type=float, default=0.0)
    parser.add_argument("--retry-after", type=float, default=1.0, help="seconds, in 429 answers")
    parser.add_argument("--stall-s", type=float, default=5.0)
    parser.add_argument("--latency-s", type=float, default=0.0, help="added to every request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rates = FaultRates(
        **{f: getattr(args, f) for f in FAULTS},
        retry_after_s=args.retry_after,
        stall_s=args.stall_s,
        latency_s=args.latency_s,
    )
    proxy = FaultProxy(args.upstream, rates, seed=args.seed, log=args.log)
    asyncio.run(proxy.serve(args.port))


if __name__ == "__main__":
    main()
