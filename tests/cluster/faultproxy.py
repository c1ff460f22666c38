"""A TCP proxy that makes a network bad, for the cluster tests (this kernel has no netem): every byte is
held back `--delay` seconds in each direction (order kept), and each request (a chunk from the client)
cuts its connection instead, with probability `--drop`: both ends are reset, as by a failing link or a
restarting load balancer, and whatever the request was never arrives.

    python tests/cluster/faultproxy.py --listen 10.1.2.1:15432 --to 10.1.2.1:5432 --delay 0.1 --drop 0.05

Prints "proxy ready" once listening; counts connections and drops on exit (SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time


class Counts:
    connections = 0
    dropped = 0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, drop: float) -> None:
    """Copy one direction, each chunk delivered `delay` seconds after it arrived, in order; with
    probability `drop` a chunk ends the connection instead."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(chunk)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while True:
            chunk = await reader.read(65536)
            if chunk and random.random() < drop:
                Counts.dropped += 1
                return
            await queue.put((time.monotonic() + delay, chunk))
            if not chunk:
                break
        await delivering
    finally:
        delivering.cancel()


async def _handle(client_r, client_w, target: tuple[str, int], delay: float, drop: float) -> None:
    Counts.connections += 1
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.transport.abort()
        return
    # Either direction ending (a cut, or a close) ends both: the connection is reset.
    pumps = [asyncio.create_task(_pump(client_r, server_w, delay, drop)),
             asyncio.create_task(_pump(server_r, client_w, delay, 0.0))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        for writer in (client_w, server_w):
            writer.transport.abort()


async def main(args: argparse.Namespace) -> None:
    host, port = args.listen.rsplit(":", 1)
    to_host, to_port = args.to.rsplit(":", 1)
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, (to_host, int(to_port)), args.delay, args.drop),
        host, int(port), reuse_address=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("proxy ready", flush=True)
    async with server:
        await stop.wait()
    print(f"proxy: {Counts.connections} connections, {Counts.dropped} cut", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--drop", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    random.seed(arguments.seed)
    asyncio.run(main(arguments))
