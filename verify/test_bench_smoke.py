"""Fast checks of the benchmark harness's pure pieces (no benchmark is run here).

Covers: /proc status parsing and the VmHWM peak measurement, the overlap factor, the
targets, the memory guard, the network registry, and rendering BENCH.md plus both figures
from a small fake result. The protocol, fits and comparison are in test_bench_protocol.py.
"""
import dataclasses
import json
import os

import numpy as np
import pytest

from bench import allocator, analysis, memory, networks, plots, render, report, run, study
from bench.config import QUICK
from bench.guard import fit_reason
from bench.harness import Key, PointRunner
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


def test_overlap_factor_counts_recomputed_pixels_per_axis():
    plan = {"tiles_per_axis": [5, 5], "tile_starts": [[0, 506, 1012, 1518, 1536]] * 2,
            "tile_stops": [[512, 1018, 1524, 2030, 2048]] * 2}
    assert analysis.overlap_factor(plan, 2048) == pytest.approx((5 * 512 / 2048) ** 2)
    assert analysis.overlap_factor({}, 2048) is None


def _point(mode, size, tile, step_s, peak, plan_stream=None, plan_conv=None, clean=True, variant="default"):
    inp = 12 * size * size
    plan = {"tiles_per_axis": [2, 2], "tile_starts": [[0, size // 2]] * 2, "tile_stops": [[size // 2, size]] * 2}
    if plan_stream:
        plan["streaming_peak_bytes"] = plan_stream + inp
    if plan_conv:
        plan["conventional_peak_bytes"] = plan_conv + inp
    return {"network": "conv3", "mode": mode, "size": size, "tile": tile, "variant": variant, "input_bytes": inp,
            "plan": plan, "status": "measured", "clean": clean, "reps": 3, "step_s": step_s,
            "forward_s": step_s / 3, "backward_s": 2 * step_s / 3, "cpu_s": 2 * step_s, "cpu_util": 0.97,
            "page_faults": 1000, "foreign_cores": 0.02 if clean else 1.2, "step_s_all": [step_s * 0.98, step_s, step_s * 1.03],
            "peak_bytes": peak, "peak_bytes_all": [peak] * 3, "loss": 0.5, "memory_method": "fake",
            "attempts": 1 if clean else 2, "extra_steps": 0 if clean else 3, "disturbances": [] if clean else ["busy"]}


def test_targets_report_met_and_not_met_with_numbers():
    conv = _point("conventional", 1024, None, 2.0, 1000 * MIB, plan_conv=900 * MIB)
    stream = [_point("streaming", 1024, 128, 3.0, 50 * MIB, plan_stream=45 * MIB),
              _point("streaming", 1024, 512, 1.5, 200 * MIB, plan_stream=100 * MIB)]
    rows = {t["target"]: t for t in analysis.targets(stream, conv)}
    assert rows["peak memory <= 1/10 of conventional"]["met"] and rows["peak memory <= 1/10 of conventional"]["tile"] == 128
    assert rows["peak memory within 1.2x of plan()"]["value"] == pytest.approx(50 / 45)
    assert rows["step time no slower than conventional"]["met"] and rows["step time no slower than conventional"]["tile"] == 512
    assert not rows["one tile meets both the memory and the time target"]["met"]


def test_plan_target_gives_the_memory_probe_beside_the_timed_peak():
    """The verdict is the timed steps' (glibc's defaults, as users get them); the probe with the mmap
    threshold fixed is said beside it, as that is what plan() models."""
    conv = _point("conventional", 1024, None, 2.0, 1000 * MIB, plan_conv=900 * MIB)
    stream = [_point("streaming", 1024, 128, 3.0, 70 * MIB, plan_stream=50 * MIB)]
    row = next(t for t in analysis.targets(stream, conv) if t["target"] == "peak memory within 1.2x of plan()")
    assert not row["met"] and row["detail"] == "measured / plan() = 1.40"
    stream[0]["fixed_mmap_peak_bytes"] = 48 * MIB
    row = next(t for t in analysis.targets(stream, conv) if t["target"] == "peak memory within 1.2x of plan()")
    assert not row["met"] and row["value"] == pytest.approx(1.4)
    assert row["detail"].startswith("measured / plan() = 1.40 (0.96 with glibc's mmap threshold fixed")


def test_plan_ratio_per_input_gives_the_memory_probe_where_there_is_one():
    pts = [_point("streaming", s, 512, 1.0, 60 * MIB, plan_stream=50 * MIB) for s in (1024, 2048)]
    pts[1]["fixed_mmap_peak_bytes"] = 45 * MIB
    ratios = analysis.fig3_fits(pts, 1024)["plan_ratio"]
    assert [r["ratio"] for r in ratios] == pytest.approx([1.2, 1.2])
    assert ratios[0]["fixed_ratio"] is None and ratios[1]["fixed_ratio"] == pytest.approx(0.9)


def test_memory_lines_leave_out_inputs_one_tile_covers():
    # ResNet-34's case: a 2800 tile covers 1024² and 2048² whole; memory there is the image's, not the tile's.
    pts = [_point("streaming", s, 2800, 1e-6 * s * s, 300 * MIB + 30 * s * s, plan_stream=280 * MIB + 28 * s * s)
           for s in (1024, 2048, 4096, 8192, 16384)]
    for p in pts[:2]:
        p["plan"]["tiles_per_axis"] = [1, 1]
        p["peak_bytes"] = 40 * p["size"] ** 2  # far below the tiled line's constant: would be flagged if fitted
    fits = analysis.fig3_fits(pts, 1024)
    assert fits["single_tile"] == [1024, 2048]
    assert [r["size"] for r in fits["memory"]["rows"]] == [4096, 8192, 16384]
    assert fits["memory"]["b"] == pytest.approx(30) and fits["memory"]["r2"] == pytest.approx(1.0)
    assert fits["time"]["n"] == 5  # time is linear in pixels either way
    assert analysis.fig3_fits(pts[:4], 1024)["memory"] is None  # two tiled inputs: no line


def test_tick_labels_never_overprint_and_keep_the_preferred_sides():
    sides = [1024, 2048, 2896, 3072, 4096, 8192, 16384]
    assert plots.tick_labels(sides, preferred=[1024, 2048, 3072, 4096, 8192, 16384])[2:4] == ["", "3072"]
    assert plots.tick_labels(sides)[2:4] == ["2896", ""]
    assert plots.tick_labels([1280, 1536, 2048]) == ["1280", "1536", "2048"]  # a narrow axis has room
    assert plots.tick_labels([512]) == ["512"]


def test_guard_skips_a_point_that_plan_says_will_not_fit():
    huge = {"conventional_peak_bytes": 10**15}
    reason = fit_reason("conventional", 1024, "cpu", huge, QUICK, 12 * 1024**2)
    assert reason and "available" in reason
    assert fit_reason("conventional", 64, "cpu", {"conventional_peak_bytes": MIB}, QUICK, 12 * 64**2) is None
    assert "streaming_peak_bytes" in fit_reason("streaming", 64, "cpu", {"error": "too small"}, QUICK, 12 * 64**2)


def test_micro_summary_pairs_reference_and_torch():
    bench = lambda impl, t: {"extra_info": {"case": "c", "op": "forward", "impl": impl}, "stats": {"median": t}}  # noqa: E731
    rows = summarise_micro({"benchmarks": [bench("reference", 0.3), bench("torch", 0.1)]})["rows"]
    assert rows == [{"case": "c", "op": "forward", "reference_s": 0.3, "torch_s": 0.1, "ratio": pytest.approx(3.0)}]


def _fake_run(tmp_path):
    """A full run's results from fake points: like-for-like conventional fits up to 1024², streaming to 4096²."""
    pts = networks.Points(fig2_input=1024, fig2_tiles=(128, 512), fig3_tile=128, fig3_sizes=(256, 512, 1024, 2048, 4096),
                          conventional_sizes=(256, 512, 1024, 2048), default_layout_sizes=(1024,), overhead_tiles=(128,),
                          fit_min_side=256, oracle_max=0)
    net = dataclasses.replace(networks.CONV3, full=pts)
    cfg = dataclasses.replace(QUICK, name="full", out_dir=tmp_path, raw_dir=tmp_path)
    runner = PointRunner(cfg, "cpu")

    def put(p):
        runner.cache[Key("conv3", p["mode"], p["size"], p["tile"], p["variant"])] = p
    for size in (256, 512, 1024):
        put(_point("conventional", size, None, 0.2 + 2e-6 * size ** 2, 900 * size ** 2, plan_conv=880 * size ** 2))
    put({**_point("conventional", 2048, None, 1, 1), "status": "skipped", "reason": "would not fit"})
    put(_point("conventional_default", 1024, None, 6.0, 1400 * MIB))
    for size in (256, 512, 1024, 2048, 4096):
        t = 0.1 + 2.4e-6 * size ** 2 * (1.5 if size == 512 else 1.0)  # 512² is 43 % off the line: flagged
        put(_point("streaming", size, 128, t, 20 * MIB + 40 * size ** 2, plan_stream=19 * MIB + 40 * size ** 2,
                   plan_conv=880 * size ** 2, clean=size != 2048))
    put({**_point("streaming", 1024, 512, 2.1, 200 * MIB, plan_stream=190 * MIB, plan_conv=880 * 1024 ** 2),
         "fixed_mmap_peak_bytes": 191 * MIB})
    for variant in ("heap_malloc", "omp_passive", "one_thread"):
        put(_point("streaming", 1024, 128, 2.9, 60 * MIB, variant=variant))
    monkey_net = {"conv3": net}
    return cfg, runner, monkey_net


def test_report_and_figures_render_from_a_fake_result(tmp_path, monkeypatch):
    cfg, runner, nets = _fake_run(tmp_path)
    monkeypatch.setattr(networks, "NETWORKS", nets)
    results = {"schema": 2, "run": "full", "config": {"seed": 0, "memory_margin_bytes": 2**31},
               "protocol": run.protocol_record(cfg, runner),
               "machine": {"date": "today", "cpu_model": "fake CPU", "cpu_cores": 2, "mem_total_bytes": 2**34,
                           "device": "cpu", "torch": "x", "numpy": "y", "python": "z", "torch_threads": 2,
                           "platform": "p", "load_avg_1min_at_start": 0.1},
               "networks": {"conv3": run.network_results(cfg, "conv3", runner)},
               "unavailable": {"resnet34": "no torchvision"},
               "micro": {"rows": [{"case": "c", "op": "forward", "reference_s": 0.3, "torch_s": 0.1, "ratio": 3.0}]},
               "comparison": {"reference": "ref", "rows": [], "missing": True}, "elapsed_s": 60.0}
    analysis.rederive(results)
    res = results["networks"]["conv3"]["analysis"]
    time_fit = res["fig3_fits"]["time"]
    assert time_fit["n"] == 4 and [r["flagged"] for r in time_fit["rows"]] == [False, True, False, False, False]
    assert res["conventional_fits"]["time"]["b"] == pytest.approx(2e-6)
    assert [e["size"] for e in res["conventional_extrapolated"]] == [2048, 4096]
    assert res["headline"]["extrapolated"]["memory"] == pytest.approx(900 * 4096 ** 2)
    assert results["quiet"]["disturbed"][0]["point"] == "conv3 streaming 2048² tile 128"
    render.write(cfg.out_dir, results)
    text = (tmp_path / "BENCH.md").read_text()
    for needle in ("**Measured on: fake CPU", "Not a clean run", "## Three 3×3 convolutions", "### Headline",
                   "### Targets", "fig2_memory_vs_tile.png", "fig3_time_vs_input.png", "(fit)", "would not fit",
                   "**flagged**", "µs per pixel", "default layout (not like for like)", "step, 1 thread", "passive OpenMP wait",
                   "Nothing to compare with", "| 200 MiB | 191 MiB | 190 MiB |", "Memory with the allocator held fixed",
                   "### Re-measured and disturbed points", "`resnet34`: **not measured**",
                   "## A slide that is mostly background", "## Dense prediction: a U-Net"):
        assert needle in text, needle
    for png in ("fig2_memory_vs_tile.png", "fig3_time_vs_input.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_every_registered_network_builds_and_names_its_own_figures():
    figures = set()
    for net in networks.NETWORKS.values():
        figures |= set(net.figures().values())
    assert len(figures) == 2 * len(networks.NETWORKS)
    full = networks.CONV3.full  # the issue: Fig. 3 from 1 MP to 268 MP, fitted over all of it
    assert (min(full.fig3_sizes), full.headline_size, full.fit_min_side) == (1024, 16384, 1024)
    assert networks.get("conv3").build(0)[1].out_channels == 64
    with pytest.raises(ValueError, match="registered: conv3"):
        networks.get("nope")


def test_grad_agreement_judges_float32_gradients_by_the_float64_oracle(tmp_path):
    import torch

    cfg = dataclasses.replace(QUICK, out_dir=tmp_path, raw_dir=tmp_path)
    runner = PointRunner(cfg, "cpu")
    oracle, stream = Key("conv3", "oracle", 64, None), Key("conv3", "streaming", 64, 32)
    ref = {"0.weight": torch.ones(4, dtype=torch.float64), "0.bias": torch.ones(2, dtype=torch.float64)}
    torch.save(ref, runner.grads_path(oracle, "float64"))
    torch.save({"0.weight": torch.ones(4) * 1.001, "0.bias": torch.ones(2)}, runner.grads_path(stream))
    runner.cache[oracle] = {"status": "measured", "loss": 0.25}
    runner.cache[stream] = {**_point("streaming", 64, 32, 1.0, MIB), "loss": 0.25}
    (row,) = run.grad_agreement(runner, "conv3")
    assert row["streaming"]["weights"] == pytest.approx(1e-3, rel=1e-3)
    assert row["streaming"]["biases"] == 0.0
    assert row["conventional"] is None  # no conventional float32 point at this size


def test_allocator_note_renders_each_setting_and_its_spread():
    step = lambda mib, t: {"peak_growth_bytes": mib * MIB, "step_s": t, "disturbed": None}  # noqa: E731
    rec = {"network": "conv3", "size": 2048, "steps": 2, "processes": 2, "date": "2026-11-23T22:00",
           "points": [{"mode": "streaming", "tile": 256, "plan_bytes": 131 * MIB, "runs": {
               "glibc defaults": [[step(134, 4.0), step(150, 4.2)], [step(139, 4.1), step(139, 4.1)]],
               "mmap threshold fixed at 128 KiB": [[step(132, 4.4), step(132, 4.4)], [step(132, 4.6), step(132, 4.4)]]}}]}
    text = allocator.render(rec)
    assert "| streaming, tile 256 | glibc defaults | 150 MiB, 139 MiB | 134 MiB – 150 MiB | +11.9% | 131 MiB | 4.10 s | 1.00× | none |" in text
    assert "| mmap threshold fixed at 128 KiB | 132 MiB, 132 MiB | 132 MiB – 132 MiB | +0.0% | 131 MiB | 4.40 s | 1.07× |" in text
    assert allocator.render({}) == ""


def test_second_run_comparison_is_rederived_with_each_steps_peak():
    first = _point("streaming", 1024, 256, 2.0, 100 * MIB)
    again = {**first, "peak_bytes": 110 * MIB, "peak_bytes_all": [110 * MIB, 100 * MIB, 100 * MIB]}
    results = {"schema": 2, "networks": {"conv3": {"points": [first], "points_config": dataclasses.asdict(networks.CONV3.quick)}},
               "second_run": {"points": [again]}}
    rows = analysis.rederive(results)["second_run"]["comparison"]["rows"]
    assert len(rows) == 1 and rows[0]["memory_ratio"] == pytest.approx(1.1) and not rows[0]["memory_ok"]
    assert "each step's peak: 110.0, 100.0, 100.0 MiB here, 100.0, 100.0, 100.0 MiB there" in report._second_run(
        {**results, "second_run": {**results["second_run"], "groups": ["fig2"], "elapsed_s": 60,
                                   "quiet": {"clean": 1, "points": 1}, "machine": {"date": "d", "cpu_model": "c", "cpu_cores": 2, "mem_total_bytes": 2**34, "device": "cpu",
                                               "torch_threads": 2, "torch": "x"}}})


def test_memory_probe_column_is_left_out_only_where_no_point_has_a_probe():
    from bench.report_network import _table_without_empty_probe

    header = ["tile", "peak memory", "peak, mmap threshold fixed", "plan()"]
    without = _table_without_empty_probe(header, [[128, "112 MiB", "–", "105 MiB"], [256, "139 MiB", "–", "131 MiB"]])
    assert "mmap threshold fixed" not in without and "| 128 | 112 MiB | 105 MiB |" in without
    kept = _table_without_empty_probe(header, [[128, "112 MiB", "105 MiB", "105 MiB"], [256, "139 MiB", "–", "131 MiB"]])
    assert "mmap threshold fixed" in kept and "| 256 | 139 MiB | – | 131 MiB |" in kept


def test_a_quick_run_says_where_it_writes_at_its_start_and_end(tmp_path, monkeypatch, capsys):
    """`make bench QUICK=1` names its folder (not reports/) before measuring, and at the end
    again with how much its scratch holds; the measuring itself is replaced by a stub."""
    quick = tmp_path / "_raw" / "quick"
    monkeypatch.setattr(run, "QUICK", dataclasses.replace(QUICK, out_dir=quick, raw_dir=quick))
    said_first = []

    def measured(cfg, args, device, started):
        said_first.append(capsys.readouterr().out)
        (cfg.raw_dir / "grads.pt").write_bytes(b"x" * 3_000_000)
        return {"networks": {}}

    monkeypatch.setattr(run, "full_run", measured)
    monkeypatch.setattr(run, "pick_device", lambda: "cpu")
    monkeypatch.setattr(render, "write", lambda out_dir, results: None)
    assert run.main(["--quick"]) == 0
    first, last = said_first[0], capsys.readouterr().out
    assert f"into {quick}/, not into reports/" in first
    assert f"into {quick}/, not into reports/" in last and f"{quick}/ holds 3 MB" in last


def test_an_outlying_step_neither_widens_the_whisker_nor_stretches_the_axis():
    """A step far from its point's median (a slow first step) is drawn apart as a hollow circle
    after the axis is set; one beyond the axis sits on its edge, labelled with its time."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    pts = [{"status": "measured", "size": s, "step_s": 1.0 * s, "step_s_all": [0.98 * s, 1.0 * s, 1.03 * s]}
           for s in (1, 2, 3)]
    pts[1]["step_s_all"] = [2.0, 2.02, 40.0]  # one step 20x its point's median
    outlying = plots._series(ax, pts, "step_s", "size", "C0", "streaming", errors=True)
    assert outlying == [(2, 40.0)]
    (whiskers,) = [c for c in ax.collections if len(c.get_segments()) == 3]
    assert max(seg[:, 1].max() for seg in whiskers.get_segments()) == pytest.approx(3.09)
    plots._outlying_steps(ax, outlying, "C0")
    assert ax.get_ylim()[1] < 5
    assert [t.get_text() for t in ax.texts] == ["40 s"]
    assert "a step more than 25% off its point's median (not in the whisker)" in ax.get_legend_handles_labels()[1]
    plt.close(fig)


def test_a_study_re_renders_through_the_command_line(tmp_path, monkeypatch, capsys):
    """`python -m bench.slide` and the other studies store their records, then re-render BENCH.md by
    running `python -m bench --render-only` (the renderer imports the studies, so they cannot import
    it), and only for reports/' own files once bench.json is there to re-render from."""
    monkeypatch.setattr(study, "REPORTS", tmp_path)
    calls, record = [], {"side": 64, "status": "failed", "reason": "boom"}
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, **kw: calls.append((cmd[1:], path_of[0])))
    path_of = [None]

    def finish(path):
        path_of[0] = path
        study.finish(path, [record], lambda r: r["side"], str)
    finish(tmp_path / "slide.json")
    assert calls == [] and "64: failed boom" in capsys.readouterr().out  # no bench.json yet
    (tmp_path / "bench.json").write_text("{}")
    (tmp_path / "_raw").mkdir()
    finish(tmp_path / "_raw" / "check.json")
    finish(tmp_path / "slide.json")
    assert calls == [(["-m", "bench", "--render-only"], tmp_path / "slide.json")]
    assert json.loads((tmp_path / "slide.json").read_text())["64"] == record


def test_speed_study_renders_its_records_and_targets():
    """bench.speed's BENCH.md section from records (no measurement): every row, the ratios
    against conventional with the same head, and the three targets judged."""
    from bench import speed

    def rec(mode, head, step, tile=0, budget="0"):
        r = {"status": "measured", "side": 64, "mode": mode, "tile": tile, "head": head, "budget": budget,
             "keep_bytes": 0, "threads": 2, "step_s": step, "peak_bytes": 2**20, "recomputed": 3,
             "reused": 1, "skipped": 5, "disturbance": ""}
        return speed.key(r), r

    stored = dict([rec("conventional", "sum", 2.0), rec("conventional", "max", 2.0),
                   rec("streaming", "sum", 2.2, 512), rec("streaming", "max", 1.0, 512),
                   rec("streaming", "sum", 2.2, 512, "half")])
    text = speed.render(stored)
    assert "1.10×" in text and "0.50×" in text
    assert text.count("**met**") == 2 and text.count("**not met**") == 1
    assert "Not measured yet" in speed.render({})
