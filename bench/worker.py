"""One measured benchmark point, meant to run in a fresh subprocess.

    python -m bench.worker '{"mode": "streaming", "size": 2048, "tile": 512, ...}'

prints one line ``BENCH_RESULT {json}``. A fresh process per point means no
memory left over from earlier points can hide (or inflate) this point's peak.
The input is allocated before the memory baseline is taken, so the reported
peak is what the training step needs on top of the data it trains on.
"""
import json
import sys
import time

import torch

from bench.memory import PeakMemory
from bench.network import build_network, make_input

RESULT_PREFIX = "BENCH_RESULT "
SMALL_WARMUP_TILES = 2  # side of the small warm-up input, in tiles


def build_model(mode: str, tile, seed: int):
    """(network, model to train): the model is the network itself or streamcnn.Streaming around it."""
    net = build_network(seed)
    if mode == "conventional":
        return net, net
    if mode == "streaming":
        from streamcnn import Streaming

        return net, Streaming(net, tile)
    raise ValueError(f"mode must be 'conventional' or 'streaming', got {mode!r}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training_step(model, x, device: str) -> dict:
    """Forward, mean loss, backward; returns the forward/backward wall times and the loss."""
    model.zero_grad(set_to_none=True)
    _sync(device)
    f0 = _minor_faults()
    t0, c0 = time.perf_counter(), time.process_time()
    y = model(x)
    _sync(device)
    t1 = time.perf_counter()
    loss = y.mean()
    loss.backward()
    _sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t2 - t0, "cpu_s": c2 - c0,
            "page_faults": _minor_faults() - f0, "loss": loss.item()}


def _minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages being mapped in), 0 where unknown."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(model, spec: dict, x) -> None:
    """One untimed step: on the full input, (for huge inputs) on a few tiles only, or none.

    The small warm-up loads the libraries and primes the tile-sized kernels that
    streaming runs, without paying for a whole extra step on a huge image.
    """
    if spec["warmup"] == "none":
        return
    if spec["warmup"] == "full":
        training_step(model, x, spec["device"])
    elif spec["warmup"] == "small":
        side = min(spec["size"], SMALL_WARMUP_TILES * (spec["tile"] or spec["size"]))
        small = make_input(side, spec["seed"], spec["device"]).to(x.dtype)
        training_step(model, small, spec["device"])
    else:
        raise ValueError(f"warmup must be 'full', 'small' or 'none', got {spec['warmup']!r}")
    model.zero_grad(set_to_none=True)


def measure(spec: dict) -> dict:
    """Run warm-up plus ``reps`` measured steps; every step's time and peak growth are kept.

    ``spec['dtype']`` (default float32) other than float32 is used only for the
    float64 gradient oracle; the input is drawn in float32 and converted, so it is
    the same image.
    """
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    net, model = build_model(spec["mode"], spec.get("tile"), spec["seed"])
    model.to(device=device, dtype=dtype)
    x = make_input(spec["size"], spec["seed"], device).to(dtype)
    warm_up(model, spec, x)
    steps, method = [], None
    for _ in range(spec["reps"]):
        with PeakMemory(device) as peak:
            step = training_step(model, x, device)
        steps.append({**step, "peak_growth_bytes": peak.growth, "baseline_bytes": peak.baseline})
        method = peak.method
    if spec.get("grads_path"):
        torch.save({n: p.grad.detach().cpu() for n, p in net.named_parameters()}, spec["grads_path"])
    return {"spec": spec, "steps": steps, "memory_method": method}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.worker '<json spec>'", file=sys.stderr)
        return 2
    result = measure(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
