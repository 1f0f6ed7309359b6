"""Benchmark: how big the range requests of a streamed merge should be (hub/stream.py).

    python bench/range_bench.py                       # 128 MB shard, 100 MB/s link, 0 and 50 ms latency
    python bench/range_bench.py --mb 256 --latency 0 0.02 0.1 --sizes 1 4 16 64

Serves one synthetic safetensors shard (2 MiB tensors) from tests/hub_server.py on 127.0.0.1,
limited to a bandwidth and with a wait before each answer (a far server's time to first
byte), and reads it the way a merge does (HubModel: blocks of adjacent tensors up to the
request size, RANGE_WORKERS requests in flight, read-ahead window 1 GiB), once per request
size. Prints the throughput as a fraction of the link. Everything stays on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(mb: int) -> bytes:
    """A safetensors file of `mb` MiB of 2 MiB bf16 tensors (random bytes; nothing parses them)."""
    n, numel = mb // 2, 1024 * 1024
    header = {
        f"t{i:04d}": {"dtype": "BF16", "shape": [numel], "data_offsets": [i * 2 * numel, (i + 1) * 2 * numel]}
        for i in range(n)
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + os.urandom(n * 2 * numel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=128, help="shard size in MiB")
    ap.add_argument("--bandwidth", type=float, default=100, help="link in MB/s (each way)")
    ap.add_argument("--latency", type=float, nargs="+", default=[0.0, 0.05], help="seconds before each answer")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="request sizes in MiB")
    a = ap.parse_args()

    home = tempfile.mkdtemp(prefix="range-bench-")
    os.environ.update(
        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        HF_HOME=home,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1",
    )
    from tests.hub_server import HubServer  # noqa: E402 (after HF_ENDPOINT)

    from lrmerge_hub.hub.stream import HubModel
    from lrmerge_hub.settings import DEFAULT_READ_AHEAD, RANGE_WORKERS

    server = HubServer(port=int(os.environ["HF_ENDPOINT"].rsplit(":", 1)[1])).start()
    data = shard(a.mb)
    folder = Path(home) / "side"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    sha = server.commit_files("bench/model", {"model.safetensors": data, "config.json": b"{}"})
    print(f"{len(data) / 1e6:.0f} MB shard, link {a.bandwidth:.0f} MB/s, {RANGE_WORKERS} requests in flight")
    print(f"{'latency':>8} {'request':>8} {'requests':>9} {'seconds':>8} {'MB/s':>7} {'of link':>8}")
    for latency in a.latency:
        server.limit_bandwidth(a.bandwidth * 1e6, latency)
        for size in a.sizes:
            start = len(server.log)
            t0 = time.perf_counter()
            model = HubModel(
                "bench",
                repo_id="bench/model",
                revision=sha,
                folder=folder,
                token=None,
                read_ahead=DEFAULT_READ_AHEAD,
                request_bytes=size * 1024**2,
                workers=RANGE_WORKERS,
            )
            names = sorted(model.tensors)
            model.read_order(names)
            for name in names:
                model.populate(name)
                model.release(name)
            model.finish()
            model.close()
            seconds = time.perf_counter() - t0
            rate = len(data) / seconds / 1e6
            print(
                f"{latency * 1000:>6.0f}ms {size:>5} MiB {len(server.log) - start:>9} {seconds:>8.2f} "
                f"{rate:>7.1f} {rate / a.bandwidth:>8.0%}"
            )
    server.stop()


if __name__ == "__main__":
    main()
