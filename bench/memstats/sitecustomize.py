"""Memory figures of a soak's daemons (`python bench/soak.py --memstats DIR`).

Python imports `sitecustomize` at start-up from its path; the soak puts this directory on
the daemons' PYTHONPATH and sets SOAK_MEMSTATS_DIR. Nothing else imports it, and it does
nothing without that variable. Every 30 s a thread appends one JSON line to
DIR/<pid>.jsonl: RSS; Python's live objects (`sys.getallocatedblocks()`, the gc's count);
CPython's small-object arenas and the bytes in use in them; glibc's heap (`mallinfo2`:
bytes obtained from the system, in use, free inside the heap, in mmapped chunks). Live
objects that grow mean a structure grows; a heap that grows while its in-use figure does
not is the allocator keeping freed memory at its high-water mark.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("SOAK_MEMSTATS_DIR")

if _DIR:
    import ctypes
    import gc
    import json
    import re
    import sys
    import threading
    import time

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    def _mallinfo() -> dict[str, int]:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = _MallInfo2
            m = libc.mallinfo2()
        except (OSError, AttributeError):  # not glibc
            return {}
        return {"heap_kb": m.arena >> 10, "heap_used_kb": m.uordblks >> 10, "heap_free_kb": m.fordblks >> 10, "mmap_kb": m.hblkhd >> 10}

    def _pymalloc() -> dict[str, int]:
        """Arenas and bytes in use, from `sys._debugmallocstats()` (it writes to fd 2)."""
        r, w = os.pipe()
        saved = os.dup(2)
        os.dup2(w, 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(w)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        text = b"".join(chunks).decode(errors="replace")
        out = {}
        for key, pattern in (("py_arenas", r"# arenas allocated current\s*=\s*([\d,]+)"),
                             ("py_used_kb", r"# bytes in allocated blocks\s*=\s*([\d,]+)")):
            m = re.search(pattern, text)
            if m:
                value = int(m.group(1).replace(",", ""))
                out[key] = value >> 10 if key.endswith("_kb") else value
        return out

    def _rss_kb() -> int:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return -1

    def _loop() -> None:
        os.makedirs(_DIR, exist_ok=True)
        t0 = time.monotonic()
        with open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), "a") as f:
            while True:
                time.sleep(30)
                row = {"t": round(time.monotonic() - t0), "rss_kb": _rss_kb(), "blocks": sys.getallocatedblocks(),
                       "gc_objects": len(gc.get_objects()), **_pymalloc(), **_mallinfo()}
                f.write(json.dumps(row) + "\n")
                f.flush()

    threading.Thread(target=_loop, daemon=True, name="soak-memstats").start()
