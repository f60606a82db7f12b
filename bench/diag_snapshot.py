"""What is alive at a CUDA run's peaks, from a memory snapshot (issue 15's holes).

    PYTHONPATH=. python3 -m engine measure ... --target cuda --snapshot run.pickle
    PYTHONPATH=. python3 bench/diag_snapshot.py run.pickle [--top 14] > run_peaks.json

Replays the snapshot's allocator trace (``torch.cuda.memory._record_memory_history``): at the peak
of allocated bytes it lists the largest live blocks with the Python frames that allocated them; at
the peak of reserved bytes it lists the segments and the allocation that made the last segment.
Prints one JSON object. The pickle is one this repository's own ``measure --snapshot`` wrote on the
same machine (torch's snapshot format is a pickle); do not point it at files from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys


def _frames(event: dict, keep: int = 6) -> list[str]:
    out = []
    for f in event.get("frames", []):
        name = f.get("filename", "")
        if not name.endswith(".py") or "/torch/utils/_" in name:
            continue
        short = name.split("site-packages/")[-1].split("/work/")[-1]
        out.append(f"{short}:{f.get('line')}:{f.get('name')}")
        if len(out) >= keep:
            break
    return out


def peaks(trace: list[dict], top: int) -> dict:
    live: dict[int, dict] = {}
    segments: dict[int, int] = {}
    allocated = reserved = 0
    best_alloc = best_res = -1
    at_alloc: dict = {}
    at_res: dict = {}
    for i, ev in enumerate(trace):
        action, addr, size = ev.get("action"), ev.get("addr"), int(ev.get("size", 0))
        if action == "alloc":
            live[addr] = ev
            allocated += size
        elif action in ("free_completed",) and addr in live:
            allocated -= int(live.pop(addr).get("size", 0))
        elif action == "segment_alloc":
            segments[addr] = size
            reserved += size
        elif action in ("segment_free",) and addr in segments:
            reserved -= segments.pop(addr)
        if allocated > best_alloc:
            best_alloc = allocated
            blocks = sorted(live.values(), key=lambda e: -int(e.get("size", 0)))[:top]
            at_alloc = {"event": i, "allocated_bytes": allocated, "reserved_bytes": reserved,
                        "live_blocks": len(live),
                        "largest": [{"size": int(b["size"]), "frames": _frames(b)} for b in blocks]}
        if reserved > best_res:
            best_res = reserved
            at_res = {"event": i, "reserved_bytes": reserved, "allocated_bytes": allocated,
                      "segments": sorted(segments.values(), reverse=True)[:top * 2],
                      "segment_count": len(segments),
                      "made_by": {"size": size, "frames": _frames(ev)} if action == "segment_alloc" else None}
    return {"events": len(trace), "peak_allocated": at_alloc, "peak_reserved": at_res}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("snapshot")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--compact", action="store_true", help="sizes in MiB and the first frame only")
    ap.add_argument("--events-out", metavar="JSON_GZ",
                    help="also write the trace's allocations and frees, [action, addr, size] in order "
                         "(gzip JSON), for replaying through engine.estimate.allocator elsewhere")
    args = ap.parse_args()
    with open(args.snapshot, "rb") as fh:
        snap = pickle.load(fh)  # noqa: S301 - our own measure --snapshot output (docstring)
    traces = [t for t in snap.get("device_traces", []) if t]
    if not traces:
        print(json.dumps({"error": "the snapshot holds no allocator trace"}))
        return 1
    out = peaks(traces[0], args.top)
    if args.events_out:
        import gzip

        keep = ("alloc", "free_completed", "segment_alloc", "segment_free")
        rows = [[ev["action"], ev["addr"], int(ev["size"])] for ev in traces[0] if ev.get("action") in keep]
        with gzip.open(args.events_out, "wt", encoding="utf-8") as fh:
            json.dump(rows, fh)
    if args.compact:
        mib = 2 ** 20
        a, r = out["peak_allocated"], out["peak_reserved"]
        a["largest"] = [f"{b['size'] / mib:.0f} {(b['frames'] or ['(backward)'])[0]}" for b in a["largest"]]
        r["segments"] = [round(s / mib) for s in r["segments"]]
        if r.get("made_by"):
            r["made_by"] = f"{r['made_by']['size'] / mib:.0f} {' < '.join(r['made_by']['frames'][:4])}"
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
