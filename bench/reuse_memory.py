"""Page faults of a streamed step with and without ``Streaming(reuse_memory=...)``.

``python -m bench.reuse_memory [size] [tile] [steps] [processes]`` (defaults: the Fig. 2 network,
2048², tile 512, 3 steps, 1 process per setting): every setting runs in fresh processes
(alternating), each an untimed warm-up step and then ``steps`` steps (forward, mean loss,
backward). Per step: minor page faults (deterministic, unlike time on a shared machine), those of
the forward alone, CPU seconds (a rough hint only) and the resident high-water mark (VmHWM after
resetting it, /proc/self/clear_refs). The settings' parameter gradients are compared bit for bit.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(reuse: bool, size: int, tile: int, steps: int, grads_path: str) -> dict:
    import torch

    from bench.network import build_network, make_input
    from streamcnn import Streaming, allocator

    model = Streaming(build_network(0), tile, progress=False, reuse_memory=reuse)
    x = make_input(size, 0)

    def usage():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_minflt, r.ru_utime + r.ru_stime

    def step():
        model.zero_grad(set_to_none=True)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _status("VmRSS:")
        f0, c0 = usage()
        y = model(x)
        f1, _ = usage()
        y.mean().backward()
        f2, c2 = usage()
        return {"faults": f2 - f0, "forward_faults": f1 - f0, "cpu_s": round(c2 - c0, 2),
                "rss_before_MiB": rss >> 20, "vmhwm_MiB": _status("VmHWM:") >> 20}

    step()
    rows = [step() for _ in range(steps)]
    torch.save([p.grad for p in model.parameters()], grads_path)
    return {"reuse_memory": reuse, "applied": allocator.glibc() is not None, "steps": rows}


def main(size: int = 2048, tile: int = 512, steps: int = 3, processes: int = 1) -> None:
    import torch

    results = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        grads = {}
        for i in range(processes):
            for reuse in (False, True) if i % 2 == 0 else (True, False):
                path = str(Path(tmp) / f"{reuse}_{i}.pt")
                out = subprocess.run([sys.executable, "-m", "bench.reuse_memory", "--child",
                                      json.dumps([reuse, size, tile, steps, path])],
                                     capture_output=True, text=True, check=True)
                results[reuse].append(json.loads(out.stdout.splitlines()[-1]))
                grads.setdefault(reuse, torch.load(path))
        same = all(torch.equal(a, b) for a, b in zip(grads[True], grads[False], strict=True))
    print(f"Fig. 2 network, {size}², tile {tile}: {steps} steps after a warm-up, {processes} fresh "
          f"process(es) per setting; parameter gradients bit-identical: {same}\n")
    print("| reuse_memory | page faults per step | of which forward | CPU s per step (hint) "
          "| VmHWM during step | RSS before step |")
    print("|---|---|---|---|---|---|")
    for reuse in (False, True):
        rows = [r for proc in results[reuse] for r in proc["steps"]]
        col = lambda k: ", ".join(str(r[k]) for r in rows)  # noqa: E731
        print(f"| {reuse} | {col('faults')} | {col('forward_faults')} | {col('cpu_s')} "
              f"| {col('vmhwm_MiB')} MiB | {col('rss_before_MiB')} MiB |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(*json.loads(sys.argv[2]))))
    else:
        main(*(int(a) for a in sys.argv[1:]))
