"""One measured benchmark point, meant to run in a fresh subprocess.

    python -m bench.worker '{"network": "conv3", "mode": "streaming", "size": 2048, "tile": 512, ...}'

prints one line ``BENCH_RESULT {json}``. A fresh process per point means no
memory left over from earlier points can hide (or inflate) this point's peak.
The input is allocated before the memory baseline is taken, so the reported
peak is what the training step needs on top of the data it trains on.

Modes: ``streaming`` (streamcnn.Streaming around the network), ``conventional``
(plain backprop with the input in the layout Streaming gives its tiles, so the
two are compared like for like), ``conventional_default`` (plain backprop in
torch's default contiguous layout, reported separately).
"""
import json
import sys
import time

import torch

from bench import networks, protocol
from bench.memory import PeakMemory

RESULT_PREFIX = "BENCH_RESULT "
SMALL_WARMUP_TILES = 2  # side of the small warm-up input, in tiles
MODES = ("streaming", "conventional", "conventional_default")


def tile_layout(x: torch.Tensor, module) -> str:
    """The memory layout Streaming gives each tile of ``x`` through ``module`` by default."""
    from streamcnn.channels_last import use_channels_last

    return ("channels_last" if x.dim() == 4 and use_channels_last(x.device, x.dtype, module)
            else "contiguous")


def build_model(net, mode: str, tile):
    """The model to train: the network itself or streamcnn.Streaming around it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "streaming":
        from streamcnn import Streaming

        return Streaming(net, tile, progress=False)  # measured: no bar
    return net


def arrange_input(x: torch.Tensor, mode: str, model) -> tuple:
    """(input to train on, its layout name). Conventional backprop gets the tiles' layout."""
    if mode == "conventional" and tile_layout(x, model) == "channels_last":
        return x.contiguous(memory_format=torch.channels_last), "channels_last"
    if mode == "streaming":
        return x, f"tiles {tile_layout(x, model)}"
    return x, "contiguous"


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


def timed_step(model, x, spec: dict, thr: protocol.Thresholds) -> dict:
    """One training step with its peak memory, CPU use and whether other work competed with it."""
    with PeakMemory(spec["device"]) as peak:
        before = protocol.sample()
        step = training_step(model, x, spec["device"])
        after = protocol.sample()
    win = protocol.window(before, after)
    return {**step, "cpu_util": step["cpu_s"] / (step["step_s"] * spec["threads"]),
            "foreign_cores": win["foreign_cores"], "steal_cores": win["steal_cores"], "pressure": win["pressure"],
            "disturbed": protocol.disturbance(win, spec["threads"], spec["cores"], thr),
            **peak.record()}


def warm_up(model, spec: dict, x, net) -> None:
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
        small = net.make_input(side, spec["seed"], spec["device"]).to(x.dtype)
        training_step(model, arrange_input(small, spec["mode"], model)[0], spec["device"])
    else:
        raise ValueError(f"warmup must be 'full', 'small' or 'none', got {spec['warmup']!r}")
    model.zero_grad(set_to_none=True)


def measure(spec: dict) -> dict:
    """Warm-up, then timed steps until ``reps`` are undisturbed or ``max_steps`` were taken.

    ``spec['dtype']`` (default float32) other than float32 is used only for the
    float64 gradient oracle; the input is drawn in float32 and converted, so it is
    the same image.
    """
    torch.set_num_threads(spec["threads"])
    thr = protocol.Thresholds(foreign_cores=spec["foreign_cores"])
    device, dtype = spec["device"], getattr(torch, spec.get("dtype", "float32"))
    net_spec = networks.get(spec["network"])
    net = net_spec.build(spec["seed"])
    model = build_model(net, spec["mode"], spec.get("tile"))
    model.to(device=device, dtype=dtype)
    x, layout = arrange_input(net_spec.make_input(spec["size"], spec["seed"], device).to(dtype), spec["mode"], model)
    warm_up(model, spec, x, net_spec)
    steps = []
    while protocol.need_more_steps(steps, spec["reps"], spec["max_steps"]):
        steps.append(timed_step(model, x, spec, thr))
    if spec.get("grads_path"):
        torch.save({n: p.grad.detach().cpu() for n, p in net.named_parameters()}, spec["grads_path"])
    return {"spec": spec, "steps": steps, "layout": layout}


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
