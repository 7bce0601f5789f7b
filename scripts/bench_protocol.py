"""What the service's HTTP protocol (app/http_protocol.py: the head bound, the slow-client deadlines and the connection bound)
costs a request, against uvicorn's plain httptools protocol, in one run.

    python scripts/bench_protocol.py --blocks 60 --requests 50 --json /tmp/protocol.json

Starts two uvicorn servers on free loopback ports, one with each protocol, serving the same trivial ASGI
app (it reads the body and answers its size), so that nothing but the protocol differs. One kept-alive
connection to each sends ``GET`` and ``POST`` (a 100-byte body: the body deadline's path) requests one at a
time, in blocks of ``--requests`` per kind, alternating which server goes first from block to block.
Prints the median and mean round trip per protocol and kind, and the ratio bounded / plain.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = {
    "GET": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"0"),
    "POST": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"b" * 100, b"100"),
}
PROTOCOLS = ("plain", "bounded")


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(port: int, protocol: str) -> None:
    """The server process: the trivial app under uvicorn with ``protocol``."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from app.http_protocol import BODY_TIMEOUT_S, HEAD_TIMEOUT_S, BoundedHttpToolsProtocol
    from app.settings import Settings

    # as `sglora serve` runs it by default: the deadlines and the connection bound
    bounded = BoundedHttpToolsProtocol.with_timeouts(
        HEAD_TIMEOUT_S, BODY_TIMEOUT_S, Settings.model_fields["max_connections"].default, 1
    )
    http = bounded if protocol == "bounded" else HttpToolsProtocol
    uvicorn.run(_app, host="127.0.0.1", port=port, http=http, log_level="warning", lifespan="off", access_log=False)


def _connect(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> socket.socket:
    end = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"the {port} server did not start") from None
            time.sleep(0.05)


def _round_trip(s: socket.socket, request: bytes, body: bytes) -> float:
    t = time.perf_counter()
    s.sendall(request)
    data = s.recv(4096)
    while not data.endswith(b"\r\n\r\n" + body):  # uvicorn writes the head and the body apart
        more = s.recv(4096)
        if not more:
            raise SystemExit("the server closed the connection")
        data += more
    elapsed = time.perf_counter() - t
    if not data.startswith(b"HTTP/1.1 200 "):
        raise SystemExit(f"unexpected answer: {data[:80]!r}")
    return elapsed


def measure(blocks: int, requests: int) -> dict:
    from app.processes import free_port

    ports = {p: free_port() for p in PROTOCOLS}
    procs = {p: subprocess.Popen([sys.executable, __file__, "--serve", str(port), p], cwd=ROOT) for p, port in ports.items()}
    try:
        socks = {p: _connect(ports[p], procs[p]) for p in PROTOCOLS}
        times: dict[str, dict[str, list[float]]] = {p: {k: [] for k in REQUESTS} for p in PROTOCOLS}
        for p in PROTOCOLS:  # warm-up, not counted
            for request, body in REQUESTS.values():
                for _ in range(20):
                    _round_trip(socks[p], request, body)
        for block in range(blocks):
            for p in PROTOCOLS if block % 2 == 0 else PROTOCOLS[::-1]:
                for kind, (request, body) in REQUESTS.items():
                    times[p][kind].extend(_round_trip(socks[p], request, body) for _ in range(requests))
        for s in socks.values():
            s.close()
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
    out: dict = {"blocks": blocks, "requests": requests}
    for p in PROTOCOLS:
        for kind, v in times[p].items():
            out[f"{p}_{kind}_median_us"] = statistics.median(v) * 1e6
            out[f"{p}_{kind}_mean_us"] = statistics.mean(v) * 1e6
    for kind in REQUESTS:
        out[f"{kind}_median_ratio"] = out[f"bounded_{kind}_median_us"] / out[f"plain_{kind}_median_us"]
    return out


def main(argv: list[str] | None = None) -> int:
    from sglora.io import output_path_problem, write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=60, help="blocks per protocol, alternating which goes first")
    p.add_argument("--requests", type=int, default=50, help="requests of each kind per block")
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--serve", nargs=2, metavar=("PORT", "PROTOCOL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return 0
    if args.blocks < 1 or args.requests < 1:
        p.error("--blocks and --requests must be >= 1")
    if args.json and (problem := output_path_problem(args.json, "--json")):
        p.error(problem)
    r = measure(args.blocks, args.requests)
    print(f"{args.blocks} blocks of {args.requests} requests of each kind per protocol, one kept-alive connection each\n")
    print("| request | plain: median, mean | bounded: median, mean | bounded / plain (medians) |")
    print("|---|---|---|---|")
    for kind in REQUESTS:
        plain = f"{r[f'plain_{kind}_median_us']:.1f}, {r[f'plain_{kind}_mean_us']:.1f} µs"
        bounded = f"{r[f'bounded_{kind}_median_us']:.1f}, {r[f'bounded_{kind}_mean_us']:.1f} µs"
        print(f"| {kind} | {plain} | {bounded} | {r[f'{kind}_median_ratio']:.3f} |")
    if args.json:
        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
