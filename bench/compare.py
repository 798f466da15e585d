"""Point-by-point comparison of this run with a reference run (normally the committed reports/bench.json).

Every run ends with this table, so a reader sees at once how their machine compares with ours;
``python -m bench --repeat fig2,fig3`` uses it to check that a second run reproduces the first.
A point matches when network, mode, input, tile and variant are the same; its time ratio
(this / reference median step) should lie within ``TIME_TOL`` of 1 and its memory ratio within
``MEMORY_TOL``. Memory is compared as measured with glibc's mmap threshold fixed where both runs
measured it so (a figure that does not depend on the allocator's history), else as the timed steps'
peak; the timed steps' ratio is kept beside it.
"""
import json
import statistics
import subprocess
from pathlib import Path

SCHEMA = 2  # bench.json's layout since the measurement protocol; schema 1 is still read as a reference
TIME_TOL = 0.15
MEMORY_TOL = 0.05
_SCHEMA1_MODES = {"conventional": "conventional_default"}  # schema 1 ran conventional in the default layout
_SCHEMA1_VARIANTS = {"one_thread": "one_thread"}  # its "tuned" malloc settings are not measured any more


def _key(network, p, variant=None, mode=None):
    return (network, mode or p["mode"], p["size"], p["tile"], variant or p.get("variant", "default"))


def _schema1_points(results: dict) -> dict:
    """Points of a bench.json written before the protocol (one network, conventional in default layout)."""
    out = {}
    f2, f3 = results["fig2"], results["fig3"]
    for p in f2["streaming"] + [f2["conventional"]] + f3["streaming"] + f3["conventional"]:
        out[_key("conv3", p, "default", _SCHEMA1_MODES.get(p["mode"], p["mode"]))] = p
    for row in (results.get("allocator") or {}).get("rows", []):
        for old, variant in _SCHEMA1_VARIANTS.items():
            if row.get(old):
                p = row[old]
                out[_key("conv3", p, variant, _SCHEMA1_MODES.get(p["mode"], p["mode"]))] = p
    return out


def flat_points(results: dict) -> dict:
    """{(network, mode, size, tile, variant): point} of the measured points of a results dict."""
    if results.get("schema", 1) < 2:
        pts = _schema1_points(results)
    else:
        pts = {_key(name, p): p for name, net in results["networks"].items() for p in net["points"]}
    return {k: p for k, p in pts.items() if p and p.get("status") == "measured" and k[1] != "oracle"}


def _sort_key(key):
    network, mode, size, tile, variant = key
    return (network, variant != "default", variant, mode, size, tile or 0)


def memory_measure(point: dict, ref: dict) -> str:
    """Which peak two runs' points are compared by: the fixed-mmap-threshold probe's when both have one."""
    both = point.get("fixed_mmap_peak_bytes") and ref.get("fixed_mmap_peak_bytes")
    return "fixed_mmap_peak_bytes" if both else "peak_bytes"


def compare(current: dict, reference: dict, label: str) -> dict:
    """Time and memory ratio (current / reference) for every point measured in both."""
    cur, ref = flat_points(current), flat_points(reference)
    rows = []
    for key in sorted(set(cur) & set(ref), key=_sort_key):
        c, r = cur[key], ref[key]
        memory = memory_measure(c, r)
        t, m = c["step_s"] / r["step_s"], c[memory] / r[memory]
        rows.append({"network": key[0], "mode": key[1], "size": key[2], "tile": key[3], "variant": key[4],
                     "step_s": c["step_s"], "ref_step_s": r["step_s"], "time_ratio": t, "memory_measure": memory,
                     "peak_bytes": c[memory], "ref_peak_bytes": r[memory], "memory_ratio": m,
                     "timed_memory_ratio": c["peak_bytes"] / r["peak_bytes"],
                     "peaks": c.get("peak_bytes_all"), "ref_peaks": r.get("peak_bytes_all"),
                     "time_ok": abs(t - 1) <= TIME_TOL, "memory_ok": abs(m - 1) <= MEMORY_TOL,
                     "clean": c.get("clean"), "ref_clean": r.get("clean")})  # None: load not checked
    machine = reference.get("machine", {})
    return {"reference": label, "reference_date": machine.get("date"), "reference_cpu": machine.get("cpu_model"),
            "reference_schema": reference.get("schema", 1), "time_tol": TIME_TOL, "memory_tol": MEMORY_TOL,
            "rows": rows, "only_here": len(set(cur) - set(ref)), "only_there": len(set(ref) - set(cur)),
            "time_within": sum(r["time_ok"] for r in rows), "memory_within": sum(r["memory_ok"] for r in rows)}


def load_reference(path: Path, repo_root: Path):
    """(results, label) of the committed ``path`` (git HEAD), else of the file on disk, else (None, why).

    Call it before this run writes ``path``: the fallback reads what is there now.
    """
    rel = Path(path).resolve().relative_to(Path(repo_root).resolve()).as_posix()
    try:
        proc = subprocess.run(["git", "-C", str(repo_root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True)
        text = subprocess.run(["git", "-C", str(repo_root), "show", f"HEAD:{rel}"],
                              capture_output=True, text=True, check=True).stdout
        return json.loads(text), f"{rel} as committed (git HEAD {proc.stdout.strip()})"
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
        pass
    if Path(path).exists():
        try:
            return json.loads(Path(path).read_text()), f"{rel} as found before this run"
        except json.JSONDecodeError as err:
            return None, f"{rel} is not valid JSON ({err})"
    return None, f"no committed {rel} to compare with"


def summary_line(comp: dict) -> str:
    """One sentence: how many points matched and how many agree within the tolerances."""
    n = len(comp["rows"])
    if comp.get("missing"):
        return f"Nothing to compare with: {comp['reference']}."
    if not n:
        return f"No point of this run was also measured in {comp['reference']}: nothing to compare."
    ratios = sorted(r["time_ratio"] for r in comp["rows"])
    return (f"{n} points also measured in {comp['reference']}: time within ±{comp['time_tol']:.0%} on "
            f"{comp['time_within']}, memory within ±{comp['memory_tol']:.0%} on {comp['memory_within']}; "
            f"this run's step times are {statistics.median(ratios):.2f}× the reference's (median; "
            f"{ratios[0]:.2f}–{ratios[-1]:.2f}).")
