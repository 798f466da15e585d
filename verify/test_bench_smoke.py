"""Fast checks of the benchmark harness's pure pieces (no benchmark is run here).

Covers: /proc status parsing and the VmHWM peak measurement, the linear
extrapolation, the overlap factor, the targets, the memory guard, and rendering
BENCH.md plus both figures from a small fake result.
"""
import dataclasses
import os

import numpy as np
import pytest

from bench import analysis, memory, run
from bench.config import QUICK
from bench.harness import PointRunner, fit_reason
from bench.micro import summarise_micro

MIB = 2**20
STATUS = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   123456 kB\nVmRSS:\t   100000 kB\n"


def test_parse_status_reads_kib_fields_as_bytes():
    assert memory.parse_status_kib(STATUS, "VmHWM") == 123456 * 1024
    assert memory.parse_status_kib(STATUS, "VmRSS") == 100000 * 1024


def test_parse_status_names_a_missing_field():
    with pytest.raises(ValueError, match="VmSwap"):
        memory.parse_status_kib(STATUS, "VmSwap")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_sees_a_freed_64_mib_allocation():
    # The array is freed inside the block, so only a true peak measurement sees it.
    with memory.PeakMemory("cpu") as peak:
        block = np.ones(64 * MIB // 8)
        del block
    assert 60 * MIB <= peak.growth <= 96 * MIB, peak.growth
    assert peak.method


def test_peak_memory_does_not_count_what_existed_before():
    before = np.ones(64 * MIB // 8)
    with memory.PeakMemory("cpu") as peak:
        before[0] = 2.0
    assert peak.growth < 16 * MIB


def test_fit_linear_recovers_a_line_and_extrapolates_in_pixels():
    assert analysis.fit_linear([1, 2, 3], [5, 7, 9]) == pytest.approx((2, 3))
    pts = [{"status": "measured", "size": s, "peak_bytes": 10 * s * s + 7} for s in (256, 512, 1024)]
    assert analysis.extrapolate(pts, [4096], "peak_bytes")[4096] == pytest.approx(10 * 4096**2 + 7)


def test_overlap_factor_counts_recomputed_pixels_per_axis():
    plan = {"tiles_per_axis": [5, 5], "tile_starts": [[0, 506, 1012, 1518, 1536]] * 2,
            "tile_stops": [[512, 1018, 1524, 2030, 2048]] * 2}
    assert analysis.overlap_factor(plan, 2048) == pytest.approx((5 * 512 / 2048) ** 2)
    assert analysis.overlap_factor({}, 2048) is None


def _point(mode, size, tile, step_s, peak, plan_stream=None, plan_conv=None):
    inp = 12 * size * size
    plan = {"tiles_per_axis": [2, 2], "tile_starts": [[0, size // 2]] * 2, "tile_stops": [[size // 2, size]] * 2}
    if plan_stream:
        plan["streaming_peak_bytes"] = plan_stream + inp
    if plan_conv:
        plan["conventional_peak_bytes"] = plan_conv + inp
    return {"mode": mode, "size": size, "tile": tile, "input_bytes": inp, "plan": plan, "status": "measured",
            "reps": 3, "step_s": step_s, "forward_s": step_s / 3, "backward_s": 2 * step_s / 3,
            "step_s_all": [step_s] * 3, "peak_bytes": peak, "peak_bytes_all": [peak] * 3, "loss": 0.5,
            "memory_method": "fake"}


def test_targets_report_met_and_not_met_with_numbers():
    conv = _point("conventional", 1024, None, 2.0, 1000 * MIB, plan_conv=900 * MIB)
    stream = [_point("streaming", 1024, 128, 3.0, 50 * MIB, plan_stream=45 * MIB),
              _point("streaming", 1024, 512, 1.5, 200 * MIB, plan_stream=100 * MIB)]
    rows = {t["target"]: t for t in analysis.targets(stream, conv)}
    assert rows["peak memory <= 1/10 of conventional"]["met"] and rows["peak memory <= 1/10 of conventional"]["tile"] == 128
    assert rows["peak memory within 1.2x of plan()"]["value"] == pytest.approx(50 / 45)
    assert rows["step time no slower than conventional"]["met"] and rows["step time no slower than conventional"]["tile"] == 512
    assert not rows["one tile meets both the memory and the time target"]["met"]


def test_guard_skips_a_point_that_plan_says_will_not_fit():
    huge = {"conventional_peak_bytes": 10**15}
    reason = fit_reason("conventional", 1024, "cpu", huge, QUICK)
    assert reason and "available" in reason
    assert fit_reason("conventional", 64, "cpu", {"conventional_peak_bytes": MIB}, QUICK) is None


def test_micro_summary_pairs_reference_and_torch():
    bench = lambda impl, t: {"extra_info": {"case": "c", "op": "forward", "impl": impl}, "stats": {"median": t}}  # noqa: E731
    rows = summarise_micro({"benchmarks": [bench("reference", 0.3), bench("torch", 0.1)]})["rows"]
    assert rows == [{"case": "c", "op": "forward", "reference_s": 0.3, "torch_s": 0.1, "ratio": pytest.approx(3.0)}]


def test_report_and_figures_render_from_a_fake_result(tmp_path):
    cfg = dataclasses.replace(QUICK, out_dir=tmp_path, raw_dir=tmp_path, fig2_input=1024, fig2_tiles=(128, 512),
                              fig3_tile=128, fig3_sizes=(512, 1024, 2048), headline_size=2048,
                              oracle_max=0)
    runner = PointRunner(cfg, "cpu")
    c = runner.cache
    c[("conventional", 1024, None)] = _point("conventional", 1024, None, 2.0, 1000 * MIB, plan_conv=900 * MIB)
    c[("conventional", 512, None)] = _point("conventional", 512, None, 0.5, 250 * MIB, plan_conv=225 * MIB)
    c[("conventional", 2048, None)] = {"mode": "conventional", "size": 2048, "tile": None, "input_bytes": 12 * 2048**2,
                                       "plan": {}, "status": "skipped", "reason": "would not fit"}
    for tile, t in ((128, 3.0), (512, 1.5)):
        c[("streaming", 1024, tile)] = _point("streaming", 1024, tile, t, 60 * MIB, plan_stream=50 * MIB, plan_conv=900 * MIB)
    c[("streaming", 512, 128)] = _point("streaming", 512, 128, 0.8, 20 * MIB, plan_stream=18 * MIB, plan_conv=225 * MIB)
    c[("streaming", 2048, 128)] = _point("streaming", 2048, 128, 12.0, 200 * MIB, plan_stream=190 * MIB, plan_conv=3600 * MIB)
    results = {"schema": 1, "run": "quick", "config": {"seed": 0, "full_warmup_max": 4096, "reps": 3, "headline_reps": 1,
                                                       "memory_margin_bytes": 2**31},
               "machine": {"date": "today", "cpu_model": "fake CPU", "cpu_cores": 2, "mem_total_bytes": 2**34,
                           "device": "cpu", "torch": "x", "numpy": "y", "python": "z", "torch_threads": 2,
                           "platform": "p", "load_avg_1min_at_start": 0.1},
               "micro": {"rows": [{"case": "c", "op": "forward", "reference_s": 0.3, "torch_s": 0.1, "ratio": 3.0}]},
               "elapsed_s": 1.0}
    variants = {name: PointRunner(dataclasses.replace(cfg, raw_dir=tmp_path / name), "cpu") for name in run.VARIANTS}
    for name, v in variants.items():
        v.cache[("streaming", 1024, 128)] = _point("streaming", 1024, 128, 0.9, 70 * MIB)
    results.update(run.collect(cfg, runner, variants))
    est = results["fig3"]["conventional_estimated"]
    assert [e["size"] for e in est] == [2048]
    assert est[0]["peak_bytes"] == pytest.approx(4000 * MIB)  # linear in pixels through 512² and 1024²
    run.write_outputs(cfg, results)
    text = (tmp_path / "BENCH.md").read_text()
    for needle in ("## Headline", "## Targets", "fig2_memory_vs_tile.png", "fig3_time_vs_input.png",
                   "(est.)", "would not fit", "fake CPU", "3.0×", "step, 1 thread", "0.90 s"):
        assert needle in text, needle
    for png in ("fig2_memory_vs_tile.png", "fig3_time_vs_input.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_grad_agreement_judges_float32_gradients_by_the_float64_oracle(tmp_path):
    import torch

    cfg = dataclasses.replace(QUICK, out_dir=tmp_path, raw_dir=tmp_path)
    runner = PointRunner(cfg, "cpu")
    ref = {"0.weight": torch.ones(4, dtype=torch.float64), "0.bias": torch.ones(2, dtype=torch.float64)}
    torch.save(ref, runner.grads_path("conventional", 64, None, "float64"))
    torch.save({"0.weight": torch.ones(4) * 1.001, "0.bias": torch.ones(2)}, runner.grads_path("streaming", 64, 32))
    runner.cache[("oracle", 64, None)] = {"status": "measured", "loss": 0.25}
    runner.cache[("streaming", 64, 32)] = {**_point("streaming", 64, 32, 1.0, MIB), "loss": 0.25}
    (row,) = run.grad_agreement(runner)
    assert row["streaming"]["weights"] == pytest.approx(1e-3, rel=1e-3)
    assert row["streaming"]["biases"] == 0.0
    assert row["conventional"] is None  # no conventional float32 point at this size
