"""Reading the pending list: the per-entry reader (`processor.pure.jsonstream`) against an
ideal measured in the same run, whole-body `orjson.loads` (which needs the whole body in
memory, so it is a ceiling, not an option), on two shapes from CONTRACT.md §1: 5,000 tasks
of 10,000 characters (about 57 MB) and 100,000 tasks of 100 characters (about 45 MB).
The body is fed in 64 KiB chunks, as httpx hands it over. CPU only, no HTTP.

    python bench/pending_parse.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import orjson

from processor.pure.jsonstream import ArraySplitter, decode_element


def task(i: int, chars: int) -> dict[str, object]:
    text = ('lorem ipsum "dolor" sit amet é ' * (chars // 30 + 1))[:chars]
    return {
        "_id": f"{i:024x}", "type": "text_embedding", "state": "pending",
        "content": {"text": text, "model": "dengcao/Qwen3-Embedding-0.6B:Q8_0"},
        "callbackRoute": "verification_update_embedding", "callbackParams": {"targetId": "66f0c0ffee", "field": "embedding"},
        "createdAt": "2025-09-03T18:22:31.120Z", "updatedAt": "2025-09-03T18:22:31.120Z", "__v": 0,
    }


def read(chunks: list[bytes]) -> int:
    sp = ArraySplitter()
    n = 0
    for c in chunks:
        for e in sp.feed(c):
            decode_element(e)
            n += 1
    sp.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for count, chars in ((5_000, 10_000), (100_000, 100)):
        body = orjson.dumps([task(i, chars) for i in range(count)])
        chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        ours, ideal = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            assert read(chunks) == count
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            orjson.loads(body)
            ideal.append(time.perf_counter() - t)
        a, b = min(ours), min(ideal)
        print(f"{count:>7} tasks x {chars:>6} chars ({len(body) / 1e6:.1f} MB): reader {a:.3f} s "
              f"({len(body) / a / 1e6:.0f} MB/s, {count / a:,.0f} entries/s); whole-body orjson {b:.3f} s; ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
