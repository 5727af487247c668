"""Micro-benchmark: what an end-to-end digest costs per byte (engine/integrity.py).

``.venv/bin/python -m bench.micro_digest [--mib 256] [--repeat 5]``

Every page run, rootfs file and image file carries a digest that the source
computes over the bytes it sends and the destination recomputes over the
bytes it writes (one pass over data already in memory on each side). This
measures the candidates on the shapes tug digests: 4 KiB (one page, the
smallest run) and 1 MiB (a typical coalesced run or file chunk), as MiB/s on
one core and as the share of one core each would take to keep up with a
1 gbit link (~110 MiB/s of payload). The best of ``--repeat`` runs counts;
numbers depend on the machine (and on what else runs on it) and are only
printed, never asserted.

It also times the real hot paths with the chosen digest: encoding a page
run's header (:func:`tug.engine.pagestream.encode_header`, which digests the
run) and decoding and verifying runs (:class:`tug.engine.pagestream.RunDecoder`;
its rate includes the decoder's own per-run work, which dominates for
one-page runs).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import zlib
from collections.abc import Callable

from tug.engine import pagestream

LINK_MIB_S = 110.0  # 1 gbit of payload
SIZES = ((4096, "4 KiB"), (1 << 20, "1 MiB"))

CANDIDATES: dict[str, Callable[[bytes], object]] = {
    "zlib.crc32": zlib.crc32,
    "zlib.adler32": zlib.adler32,
    "blake2b(digest_size=16)": lambda b: hashlib.blake2b(b, digest_size=16).digest(),
    "sha256": lambda b: hashlib.sha256(b).digest(),
}


def best_rate(fn: Callable[[], None], nbytes: int, repeat: int) -> float:
    """MiB/s of the fastest of ``repeat`` calls of ``fn`` (which handles ``nbytes``)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="bytes digested per measurement (MiB)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    total = args.mib << 20
    print(f"{'digest':26} {'unit':>6} {'MiB/s':>8} {'core at 1 gbit':>15}")
    for size, label in SIZES:
        buf = os.urandom(size)
        n = max(1, total // size)
        for name, digest in CANDIDATES.items():

            def run(digest: Callable[[bytes], object] = digest, buf: bytes = buf, n: int = n) -> None:
                for _ in range(n):
                    digest(buf)

            rate = best_rate(run, n * size, args.repeat)
            print(f"{name:26} {label:>6} {rate:8.0f} {100 * LINK_MIB_S / rate:14.1f}%")

    # The real page-run path: header with digest on the source, decode + verify on the destination.
    for npages, label in ((1, "4 KiB"), (256, "1 MiB")):
        data = os.urandom(npages * pagestream.PAGE)
        n = max(1, total // len(data))
        wire = b"".join(pagestream.encode_header(1, 0x10000 + i * len(data), data) + data for i in range(min(n, 64)))
        reps = max(1, n // 64)

        def encode(data: bytes = data, n: int = n) -> None:
            for i in range(n):
                pagestream.encode_header(1, i * len(data), data)

        def decode(wire: bytes = wire, reps: int = reps) -> None:
            for _ in range(reps):
                dec = pagestream.RunDecoder()
                for _piece in dec.feed(wire):
                    pass
                dec.finish()

        enc = best_rate(encode, n * len(data), args.repeat)
        dec_rate = best_rate(decode, reps * min(n, 64) * len(data), args.repeat)
        print(f"{'page runs: encode_header':26} {label:>6} {enc:8.0f} {100 * LINK_MIB_S / enc:14.1f}%")
        print(f"{'page runs: decode+verify':26} {label:>6} {dec_rate:8.0f} {100 * LINK_MIB_S / dec_rate:14.1f}%")


if __name__ == "__main__":
    main()
