"""Peak-memory measurement for one training step.

CPU (Linux): the peak resident set of *this* process, via the kernel's high-water
mark ``VmHWM`` in ``/proc/self/status``. Writing ``5`` to ``/proc/self/clear_refs``
resets ``VmHWM`` to the current RSS, so ``VmHWM - RSS_before`` after the step is the
step's peak growth. Where that reset is unavailable a background thread samples
``VmRSS`` every millisecond instead (it can miss short spikes; the method used is
recorded with every result). CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus what was allocated before the step; the host's
VmHWM growth is recorded beside it.
"""
import ctypes
import gc
import re
import threading
import time

KIB = 1024
_STATUS = "/proc/self/status"


def parse_status_kib(text: str, field: str) -> int:
    """Value in bytes of a ``kB`` field (e.g. ``VmHWM``) of a /proc/<pid>/status text."""
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, flags=re.MULTILINE)
    if match is None:
        raise ValueError(f"field {field!r} not found in /proc status text")
    return int(match.group(1)) * KIB


def read_status_bytes(field: str) -> int:
    """Current value in bytes of a field of /proc/self/status."""
    with open(_STATUS) as fh:
        return parse_status_kib(fh.read(), field)


def rss_bytes() -> int:
    """Current resident-set size of this process."""
    return read_status_bytes("VmRSS")


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True if the kernel honoured it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return read_status_bytes("VmHWM") <= rss_bytes() + 4 * 1024 * KIB


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS, so the baseline is tight."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


class _RssSampler(threading.Thread):
    """Fallback: sample VmRSS every ``interval`` seconds and keep the maximum."""

    def __init__(self, interval: float = 1e-3):
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, rss_bytes(), threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, rss_bytes())


class PeakMemory:
    """Context manager measuring the peak memory growth of the enclosed block.

    ``device`` is ``"cpu"`` or a CUDA device string. The host's resident set is always
    tracked (VmHWM, or the RSS sampler where VmHWM cannot be reset); on CUDA the device's
    allocator peak is tracked too. After the block, ``growth`` is the peak bytes above the
    level just before it on the benchmarked device, and :meth:`record` gives all of it.
    """

    def __init__(self, device: str = "cpu"):
        self.device, self.growth, self.baseline, self.method = device, None, None, None
        self.host_growth, self.host_peak, self._host_base, self._sampler = None, None, None, None
        self._cuda = device.startswith("cuda")

    def __enter__(self):
        release_free_memory()
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if reset_hwm():
            host_method = "VmHWM reset via /proc/self/clear_refs"
        else:
            self._sampler = _RssSampler()
            host_method = "VmRSS sampled every 1 ms"
            self._sampler.start()
        self._host_base = rss_bytes()
        if self._cuda:
            self.baseline, self.method = torch.cuda.memory_allocated(), f"cuda.max_memory_allocated (host: {host_method})"
        else:
            self.baseline, self.method = self._host_base, host_method
        return self

    def __exit__(self, *exc):
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            self.growth = max(0, torch.cuda.max_memory_allocated() - self.baseline)
        self.host_peak = self._sampler.stop() if self._sampler is not None else read_status_bytes("VmHWM")
        self.host_growth = max(0, self.host_peak - self._host_base)
        if not self._cuda:
            self.growth = self.host_growth
        return False

    def record(self) -> dict:
        """The step's memory numbers, for a result record."""
        return {"peak_growth_bytes": self.growth, "baseline_bytes": self.baseline,
                "host_peak_growth_bytes": self.host_growth, "vmhwm_bytes": self.host_peak,
                "memory_method": self.method}


def mem_available_bytes() -> int:
    """Memory the OS says can still be allocated (MemAvailable), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            return parse_status_kib(fh.read(), "MemAvailable")
    except (OSError, ValueError):
        return 0
