"""TCP proxies that hold every chunk for a fixed one-way delay, in both directions.

Stands in for the network between a coordinator and sites on other hosts where the
kernel has no ``netem`` qdisc (``tc qdisc ... netem delay`` is the better tool where it
exists; never put either on the shared ``lo``). One process serves one listener per
target; each chunk read from one side is written to the other ``--delay-ms`` after it
arrived, in order, so a request/response pays the delay twice (one round trip). It
costs a little CPU per chunk, which the measurements that go through it share.

    python benchmarks/delay_proxy.py --delay-ms 1 127.0.0.1:50051 127.0.0.1:50052
    # prints "proxy 127.0.0.1:PORT -> 127.0.0.1:50051" per target, then runs until killed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + delay, data))
    except OSError:
        pass
    queue.put_nowait((0.0, b""))
    await sender


async def _serve(targets: list[str], delay: float, host: str) -> None:
    async def handler_for(target: str) -> asyncio.base_events.Server:
        t_host, _, t_port = target.rpartition(":")

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(t_host, int(t_port))
            except OSError:
                writer.close()
                return
            for w in (writer, up_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay))

        server = await asyncio.start_server(handle, host, 0)
        port = server.sockets[0].getsockname()[1]
        print(f"proxy {host}:{port} -> {target}", flush=True)
        return server

    servers = [await handler_for(t) for t in targets]
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", help="HOST:PORT to forward to, one listener each")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay per chunk")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    asyncio.run(_serve(args.targets, args.delay_ms / 1e3, args.host))


if __name__ == "__main__":
    main()
