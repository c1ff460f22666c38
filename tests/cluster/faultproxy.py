"""A TCP proxy that makes a network bad, for the cluster tests (this kernel has no netem): every byte is
held back `--delay` seconds in each direction (order kept), and each request (a chunk from the client)
cuts its connection instead, with probability `--drop`: both ends are reset, as by a failing link or a
restarting load balancer, and whatever the request was never arrives.

With probability `--cut-reply`, a request (only one containing `--cut-reply-to`, if given, and only if
the connection sent one containing a `--cut-reply-after` word since its last such request) arrives whole
and the connection is cut when its reply comes back, before any of the reply reaches the client: the
server did the work (a COMMIT of a transaction that wrote, committed), the client cannot know it.

    python tests/cluster/faultproxy.py --listen 10.1.2.1:15432 --to 10.1.2.1:5432 --delay 0.1 --drop 0.05
    python tests/cluster/faultproxy.py --listen 127.0.0.1:0 --to 127.0.0.1:5432 --cut-reply 0.3 \
        --cut-reply-to COMMIT --cut-reply-after INSERT UPDATE

Prints "proxy ready on HOST:PORT" once listening (port 0: a free one); counts connections, drops and
replies cut on exit (SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from dataclasses import dataclass


class Counts:
    connections = 0
    dropped = 0
    replies_cut = 0


@dataclass
class Faults:
    delay: float = 0.0
    drop: float = 0.0  # a request cuts the connection instead of arriving
    cut_reply: float = 0.0  # a request arrives, and its reply cuts the connection instead
    cut_reply_to: bytes = b""  # only requests containing this are picked for --cut-reply
    cut_reply_after: tuple[bytes, ...] = ()  # ... and only after a request containing one of these


class Link:
    """One client's connection: whether it is armed (sent a --cut-reply-after word) and whether the next
    reply from the server is to be cut."""

    armed = False
    reply_doomed = False


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, faults: Faults, link: Link,
                requests: bool) -> None:
    """Copy one direction (`requests`: client to server), each chunk delivered `delay` seconds after it
    arrived, in order. A request may end the connection instead (--drop) or doom its reply (--cut-reply);
    a doomed reply ends the connection instead of being delivered."""
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
            if chunk and requests:
                if random.random() < faults.drop:
                    Counts.dropped += 1
                    return
                link.armed = link.armed or any(word in chunk for word in faults.cut_reply_after)
                if faults.cut_reply_to in chunk and (link.armed or not faults.cut_reply_after):
                    link.armed = False
                    link.reply_doomed = random.random() < faults.cut_reply
            elif chunk and link.reply_doomed:
                Counts.replies_cut += 1
                return
            await queue.put((time.monotonic() + faults.delay, chunk))
            if not chunk:
                break
        await delivering
    finally:
        delivering.cancel()


async def _handle(client_r, client_w, target: tuple[str, int], faults: Faults) -> None:
    Counts.connections += 1
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.transport.abort()
        return
    # Either direction ending (a cut, or a close) ends both: the connection is reset.
    link = Link()
    pumps = [asyncio.create_task(_pump(client_r, server_w, faults, link, requests=True)),
             asyncio.create_task(_pump(server_r, client_w, faults, link, requests=False))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        pass  # the proxy is stopping with this connection open: it is reset like the others
    finally:
        for pump in pumps:
            pump.cancel()
        for writer in (client_w, server_w):
            writer.transport.abort()


async def main(args: argparse.Namespace) -> None:
    host, port = args.listen.rsplit(":", 1)
    to_host, to_port = args.to.rsplit(":", 1)
    faults = Faults(args.delay, args.drop, args.cut_reply, args.cut_reply_to.encode(),
                    tuple(word.encode() for word in args.cut_reply_after))
    server = await asyncio.start_server(lambda r, w: _handle(r, w, (to_host, int(to_port)), faults),
                                        host, int(port), reuse_address=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"proxy ready on {bound[0]}:{bound[1]}", flush=True)
    async with server:
        await stop.wait()
    print(f"proxy: {Counts.connections} connections, {Counts.dropped} cut, {Counts.replies_cut} replies cut",
          flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--drop", type=float, default=0.05)
    parser.add_argument("--cut-reply", type=float, default=0.0)
    parser.add_argument("--cut-reply-to", default="")
    parser.add_argument("--cut-reply-after", nargs="*", default=[])
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    random.seed(arguments.seed)
    asyncio.run(main(arguments))
