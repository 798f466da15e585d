"""Description of the machine a benchmark ran on, recorded with every result."""
import datetime
import os
import platform

from bench.memory import parse_status_kib


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_bytes() -> int:
    """Total RAM in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            return parse_status_kib(fh.read(), "MemTotal")
    except (OSError, ValueError):
        return 0


TUNING_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "DNNL_", "ONEDNN_")


def tuning_env() -> dict:
    """Environment variables that change allocator or threading behaviour, as the user has them set."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(TUNING_PREFIXES)}


def describe(device: str, threads: int) -> dict:
    """Machine, software and run-time settings to store next to the results."""
    import numpy
    import torch

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "mem_total_bytes": mem_total_bytes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": threads,
        "device": device,
        "onednn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "tuning_env": tuning_env(),
        "load_avg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_mem_total_bytes=props.total_memory)
    return info
