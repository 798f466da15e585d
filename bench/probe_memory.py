"""``python -m bench.probe_memory NETWORK [SIDE ...]``: add the memory-only probe with glibc's mmap
threshold fixed (``harness.fixed_mmap_memory``) to the stored points of reports/bench.json that lack
it, without measuring anything else; then ``python -m bench --render-only`` redraws BENCH.md.

For a network whose full run did not probe its points (``Points.fixed_mmap_memory``), or to fill in
points a run left without a probe. SIDEs (default: every side) pick the input sizes; each probe is
one warm-up and one untimed step in a fresh process, so a large side takes as long as its step.
"""
import argparse
import json
import sys

from bench.config import FULL
from bench.harness import Key, fixed_mmap_memory, pick_device


def missing(records: list, sides) -> list:
    """The measured default-variant points without a probe (or with a failed one), smallest first."""
    wanted = [p for p in records if p.get("status") == "measured" and p["mode"] != "oracle"
              and p.get("variant", "default") == "default" and p.get("fixed_mmap_peak_bytes") is None
              and (not sides or p["size"] in sides)]
    return sorted(wanted, key=lambda p: (p["size"], p["mode"], p["tile"] or 0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.probe_memory", description=__doc__.splitlines()[0])
    ap.add_argument("network")
    ap.add_argument("sides", nargs="*", type=int)
    args = ap.parse_args(argv)
    path = FULL.out_dir / "bench.json"
    results = json.loads(path.read_text())
    records = results["networks"][args.network]["points"]
    FULL.raw_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    for point in missing(records, set(args.sides)):
        key = Key(*(point.get(f, "default") for f in Key._fields))
        point.update(fixed_mmap_memory(FULL, key, device))
        path.write_text(json.dumps(results, indent=1) + "\n")  # after every probe: a crash loses nothing
        got = point["fixed_mmap_peak_bytes"]
        print(f"{key.network} {key.mode} {key.size}² tile {key.tile}: "
              + (f"{got / 2**30:.3f} GiB" if got is not None else f"failed: {point['fixed_mmap_error']}"),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
