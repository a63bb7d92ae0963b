#!/usr/bin/env python3
"""A TCP proxy that delays every byte by a fixed time each way, without limiting throughput:
`scripts/bench` puts it between the targets and Garage to play an S3 server far away (the
kernels here lack tc's netem).

    wan-proxy.py LISTEN_PORT UPSTREAM_PORT ONE_WAY_SECONDS

Data read from one side is written to the other ONE_WAY_SECONDS later, in order; reading goes
on meanwhile, so the delay adds latency, not a bandwidth cap (the proxy's own CPU aside).
"""
import asyncio
import sys


async def pump(reader, writer, delay):
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(1 << 16):
            loop.call_later(delay, writer.write, data)
    except (ConnectionError, OSError):
        pass
    finally:
        loop.call_later(delay, writer.close)


async def main(listen, upstream, delay):
    async def serve(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.sleep(delay)  # the connection's own round trip
        await asyncio.gather(
            pump(client_reader, server_writer, delay), pump(server_reader, client_writer, delay)
        )

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
