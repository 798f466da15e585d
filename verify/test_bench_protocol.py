"""The benchmark's measurement protocol, fits and run comparison, on fake numbers (nothing is measured).

Oracles are hand-computed: /proc texts with known tick counts, lines with known coefficients,
and attempts whose quiet/disturbed steps are set by construction.
"""
import dataclasses
import json
from pathlib import Path

import pytest

from bench import compare, fit, harness, protocol, run
from bench.analysis import quiet_summary
from bench.config import FIXED_MMAP_ENV, QUICK
from bench.harness import Key, PointRunner
from bench.jobs import interleave, network_jobs, select
from bench.networks import NETWORKS, Points

THR = protocol.Thresholds(foreign_cores=0.15)
PROC_STAT = "cpu  1000 50 300 9000 20 7 3 40 0 0\ncpu0 500 25 150 4500 10 3 1 20 0 0\nintr 1 2\n"


def _sample(wall, own, busy, steal=0.0, pressure=None):
    return protocol.CpuSample(wall=wall, own_s=own, busy_s=busy, steal_s=steal, pressure_s=pressure)


def _step(t, disturbed=False, foreign=0.0, peak=100, loss=0.5):
    return {"step_s": t, "forward_s": t / 3, "backward_s": 2 * t / 3, "cpu_s": 2 * t, "cpu_util": 1.0,
            "page_faults": 10, "loss": loss, "foreign_cores": foreign, "steal_cores": 0.0, "pressure": 0.0,
            "disturbed": "busy" if disturbed else None, "peak_growth_bytes": peak, "baseline_bytes": 0,
            "host_peak_growth_bytes": peak, "vmhwm_bytes": peak, "memory_method": "fake"}


# ---- sampling and the disturbance rule ----

def test_proc_stat_busy_counts_steal_but_not_idle_or_iowait():
    busy, steal = protocol.parse_proc_stat(PROC_STAT, hz=100)
    assert busy == pytest.approx((1000 + 50 + 300 + 7 + 3 + 40) / 100)
    assert steal == pytest.approx(0.40)


def test_proc_stat_without_the_all_cores_line_is_an_error():
    with pytest.raises(ValueError, match="cpu"):
        protocol.parse_proc_stat("intr 1 2\n")


def test_pressure_total_is_read_in_seconds():
    text = "some avg10=0.00 avg60=0.23 avg300=0.12 total=6228110\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    assert protocol.parse_pressure(text) == pytest.approx(6.22811)


def test_window_subtracts_own_cpu_from_the_machine_busy_time():
    win = protocol.window(_sample(0.0, 0.0, 100.0, 1.0, 5.0), _sample(2.0, 3.8, 104.6, 1.2, 5.5))
    assert win["foreign_cores"] == pytest.approx((4.6 - 3.8) / 2)
    assert win["steal_cores"] == pytest.approx(0.1)
    assert win["pressure"] == pytest.approx(0.25)


def test_two_threads_on_two_busy_cores_are_disturbed_and_on_quiet_cores_are_not():
    busy = {"wall_s": 10.0, "foreign_cores": 0.8, "steal_cores": 0.1}
    quiet = {"wall_s": 10.0, "foreign_cores": 0.05, "steal_cores": 0.02}
    assert "0.80 cores" in protocol.disturbance(busy, threads=2, cores=2, thr=THR)
    assert protocol.disturbance(quiet, threads=2, cores=2, thr=THR) is None


def test_one_thread_tolerates_other_work_on_the_core_it_leaves_free():
    win = {"wall_s": 10.0, "foreign_cores": 0.9, "steal_cores": 0.0}
    assert protocol.disturbance(win, threads=1, cores=2, thr=THR) is None
    assert protocol.disturbance({**win, "foreign_cores": 1.3}, threads=1, cores=2, thr=THR)


def test_short_windows_get_clock_tick_slack():
    # 0.3 foreign cores over 0.1 s is 3 ticks on one core: below /proc/stat's resolution slack (2 ticks x 2 cores).
    assert protocol.disturbance({"wall_s": 0.1, "foreign_cores": 0.3}, 2, 2, THR) is None
    assert protocol.disturbance({"wall_s": 10.0, "foreign_cores": 0.3}, 2, 2, THR)


def test_no_proc_stat_means_no_verdict():
    assert protocol.disturbance({"wall_s": 1.0, "foreign_cores": None}, 2, 2, THR) is None


def _fake_clock(foreign_per_sample):
    """read/sleep pair: during the k-th sleep, other work uses foreign_per_sample[k] cores."""
    state = {"wall": 0.0, "busy": 0.0, "k": 0}

    def read():
        return _sample(state["wall"], 0.0, state["busy"])

    def sleep(dt):
        state["busy"] += foreign_per_sample[min(state["k"], len(foreign_per_sample) - 1)] * dt
        state["wall"] += dt
        state["k"] += 1
    return read, sleep


def test_wait_for_quiet_waits_until_the_machine_is_quiet():
    read, sleep = _fake_clock([1.5, 1.2, 0.0])
    got = protocol.wait_for_quiet(2, 2, THR, sample_s=1.0, max_wait_s=10.0, read=read, sleep=sleep)
    assert got["quiet"] and got["waited_s"] == 2.0 and got["foreign_cores"] == pytest.approx(0.0)


def test_wait_for_quiet_gives_up_after_its_bound_and_says_so():
    read, sleep = _fake_clock([1.5])
    got = protocol.wait_for_quiet(2, 2, THR, sample_s=1.0, max_wait_s=3.0, read=read, sleep=sleep)
    assert not got["quiet"] and got["waited_s"] == 3.0 and got["foreign_cores"] == pytest.approx(1.5)


# ---- steps and attempts ----

def test_worker_takes_extra_steps_only_while_too_few_are_quiet():
    quiet3 = [_step(1.0)] * 3
    assert not protocol.need_more_steps(quiet3, reps=3, max_steps=5)
    assert protocol.need_more_steps([_step(1.0), _step(2.0, True), _step(1.0)], reps=3, max_steps=5)
    assert not protocol.need_more_steps([_step(2.0, True)] * 5, reps=3, max_steps=5)


def test_best_attempt_prefers_quiet_steps_then_less_foreign_cpu():
    a = [_step(1.0, True, 0.9)] * 3
    b = [_step(1.0), _step(1.0, True, 0.4), _step(1.0)]
    c = [_step(1.0), _step(1.0, True, 0.2), _step(1.0)]
    assert protocol.best_attempt([a, b, c]) == 2
    assert protocol.best_attempt([a, a]) == 0


def test_remeasure_is_bounded_by_attempts_and_budget():
    assert protocol.may_remeasure(1, max_attempts=2, spent_s=0, budget_s=60, cost_s=30)
    assert not protocol.may_remeasure(2, max_attempts=2, spent_s=0, budget_s=60, cost_s=30)
    assert not protocol.may_remeasure(1, max_attempts=3, spent_s=40, budget_s=60, cost_s=30)


def test_summary_uses_the_quiet_steps_and_marks_a_point_that_never_got_enough():
    clean = harness.summarise([{"steps": [_step(5.0, True, 1.0), _step(1.0), _step(3.0), _step(2.0)],
                                "wall_s": 12, "before": {}, "layout": "x"}], reps=3)
    assert clean["clean"] and clean["step_s"] == 2.0 and clean["step_s_all"] == [1.0, 3.0, 2.0]
    assert clean["steps_disturbed"] == 1 and clean["extra_steps"] == 1
    dirty = harness.summarise([{"steps": [_step(4.0, True), _step(1.0), _step(6.0, True)], "wall_s": 12,
                                "before": {}, "layout": "x"}], reps=3)
    assert not dirty["clean"] and dirty["step_s"] == 4.0 and dirty["disturbances"] == ["busy"]


def _runner(tmp_path, monkeypatch, results, **cfg_changes):
    """A PointRunner whose workers return ``results`` in turn and whose machine is always quiet."""
    cfg = dataclasses.replace(QUICK, out_dir=tmp_path, raw_dir=tmp_path, **cfg_changes)
    calls = iter(results)
    monkeypatch.setattr(harness, "run_worker", lambda *a, **k: next(calls))
    monkeypatch.setattr(protocol, "wait_for_quiet", lambda *a, **k: {"quiet": True, "waited_s": 0.0})
    return PointRunner(cfg, "cpu")


def _result(*steps):
    return {"steps": list(steps), "layout": "tiles channels_last"}


def test_a_disturbed_point_is_measured_again_in_a_fresh_process(tmp_path, monkeypatch):
    busy = _result(_step(9.0, True), _step(9.0, True), _step(1.0), _step(9.0, True))
    quiet = _result(_step(1.0), _step(1.1), _step(1.2))
    runner = _runner(tmp_path, monkeypatch, [busy, quiet], max_attempts=3, remeasure_budget_s=1e6)
    attempts = runner._attempts(Key("conv3", "streaming", 64, 32), {"threads": 2})
    assert len(attempts) == 2
    p = harness.summarise(attempts, 3)
    assert p["clean"] and p["attempts"] == 2 and p["step_s"] == 1.1


def test_remeasuring_stops_at_the_attempt_bound(tmp_path, monkeypatch):
    busy = _result(*[_step(9.0, True)] * 4)
    runner = _runner(tmp_path, monkeypatch, [busy] * 5, max_attempts=2, remeasure_budget_s=1e6)
    attempts = runner._attempts(Key("conv3", "streaming", 64, 32), {"threads": 2})
    assert len(attempts) == 2 and runner.remeasure_refused == 0
    assert not harness.summarise(attempts, 3)["clean"]


def test_remeasuring_stops_when_the_budget_is_spent(tmp_path, monkeypatch):
    busy = _result(*[_step(9.0, True)] * 4)
    runner = _runner(tmp_path, monkeypatch, [busy] * 5, max_attempts=5, remeasure_budget_s=5.0)
    attempts = runner._attempts(Key("conv3", "streaming", 64, 32), {"threads": 2})
    assert len(attempts) == 1 and runner.remeasure_refused == 1
    assert runner.remeasure_spent_s == pytest.approx(9.0)  # the one extra step beyond reps


def test_quiet_summary_says_when_the_machine_never_got_quiet():
    def point(clean, attempts=1):
        return {"network": "n", "mode": "streaming", "size": 64, "tile": 32, "status": "measured", "clean": clean,
                "attempts": attempts, "extra_steps": 0, "disturbances": ["busy"]}
    mostly_busy = quiet_summary([point(False), point(False, 2), point(True)])
    assert mostly_busy["never_quiet"] and len(mostly_busy["disturbed"]) == 2 and len(mostly_busy["remeasured"]) == 1
    fine = quiet_summary([point(True), point(True, 2)])
    assert not fine["never_quiet"] and fine["clean"] == 2 and not fine["disturbed"]
    assert fine["load_unknown"] == 2  # these fake points carry no foreign-CPU reading: nothing was checked
    assert quiet_summary([{**point(True), "foreign_cores": 0.01}])["load_unknown"] == 0


# ---- fits ----

def test_weighted_line_recovers_a_line_exactly():
    xs = [1e6, 4e6, 16e6, 64e6, 256e6]
    a, b = fit.weighted_line(xs, [0.3 + 1.1e-6 * x for x in xs])
    assert a == pytest.approx(0.3) and b == pytest.approx(1.1e-6)


def test_fit_reports_r2_and_flags_a_point_more_than_20_percent_off():
    sizes = [1024, 2048, 4096, 8192, 16384]
    pts = [{"x": s * s, "y": 0.5 + 1e-6 * s * s} for s in sizes]
    pts[1] = {**pts[1], "y": pts[1]["y"] * 1.5}
    res = fit.linear_fit(pts, "x", "y")
    assert res["n"] == 5 and 0.9 < res["r2"] <= 1.0
    assert [r["flagged"] for r in res["rows"]] == [False, True, False, False, False]
    clean = fit.linear_fit([p for i, p in enumerate(pts) if i != 1], "x", "y")
    assert clean["r2"] == pytest.approx(1.0) and not any(r["flagged"] for r in clean["rows"])


def test_fit_never_goes_through_fewer_than_three_points():
    pts = [{"x": 1.0, "y": 2.0}, {"x": 2.0, "y": 3.0}, {"x": 3.0, "y": 4.5}]
    assert fit.linear_fit(pts[:2], "x", "y") is None
    assert fit.linear_fit(pts, "x", "y", use=lambda p: p["x"] != 3.0) is None
    assert fit.linear_fit(pts, "x", "y") is not None


def test_excluded_points_still_get_their_deviation():
    pts = [{"x": float(x), "y": 1.0 + x, "ok": True} for x in range(1, 5)] + [{"x": 10.0, "y": 30.0, "ok": False}]
    res = fit.linear_fit(pts, "x", "y", use=lambda p: p["ok"])
    last = res["rows"][-1]
    assert not last["used"] and last["fit"] == pytest.approx(11.0) and last["flagged"]


# ---- comparison with the committed run ----

def _p(mode, size, tile, t, peak, variant="default", clean=True):
    return {"network": "conv3", "mode": mode, "size": size, "tile": tile, "variant": variant, "status": "measured",
            "step_s": t, "peak_bytes": peak, "clean": clean}


def _results(*points):
    return {"schema": 2, "machine": {"cpu_model": "ref CPU", "date": "then"}, "networks": {"conv3": {"points": list(points)}}}


def test_comparison_gives_ratios_and_flags_points_outside_the_tolerances():
    ref = _results(_p("streaming", 2048, 512, 10.0, 1000), _p("conventional", 2048, None, 8.0, 5000),
                   _p("streaming", 4096, 512, 40.0, 2000))
    cur = _results(_p("streaming", 2048, 512, 11.0, 1040), _p("conventional", 2048, None, 10.0, 5000),
                   _p("streaming", 1024, 512, 2.0, 500))
    comp = compare.compare(cur, ref, "ref")
    rows = {(r["mode"], r["size"]): r for r in comp["rows"]}
    assert set(rows) == {("streaming", 2048), ("conventional", 2048)}
    assert rows["streaming", 2048]["time_ratio"] == pytest.approx(1.1) and rows["streaming", 2048]["time_ok"]
    assert rows["streaming", 2048]["memory_ratio"] == pytest.approx(1.04) and rows["streaming", 2048]["memory_ok"]
    assert not rows["conventional", 2048]["time_ok"]  # 1.25x
    assert comp["only_here"] == 1 and comp["only_there"] == 1
    assert "2 points" in compare.summary_line(comp) and "1.18× the reference" in compare.summary_line(comp)


def test_comparison_says_when_nothing_matches():
    comp = compare.compare(_results(_p("streaming", 128, 64, 0.1, 10)), _results(_p("streaming", 2048, 512, 1, 1)), "ref")
    assert comp["rows"] == [] and "nothing to compare" in compare.summary_line(comp)


def test_schema1_conventional_points_are_the_default_layout():
    old = {"schema": 1, "machine": {}, "fig2": {"streaming": [], "conventional": _p("conventional", 2048, None, 13.7, 3000)},
           "fig3": {"streaming": [_p("streaming", 2048, 512, 14.6, 250)], "conventional": []},
           "allocator": {"rows": [{"tuned": _p("streaming", 2048, 128, 19.0, 107),
                                   "one_thread": _p("streaming", 2048, 128, 5.1, 107)}]}}
    keys = set(compare.flat_points(old))
    assert ("conv3", "conventional_default", 2048, None, "default") in keys
    assert ("conv3", "streaming", 2048, 512, "default") in keys
    assert ("conv3", "streaming", 2048, 128, "one_thread") in keys
    assert not any(k[4] not in ("default", "one_thread") for k in keys)  # its malloc settings differ from ours


# ---- which points, in which order ----

def test_shared_points_are_measured_once_and_default_layout_rows_only_on_cpu():
    pts = Points(fig2_input=512, fig2_tiles=(128, 512), fig3_tile=128, fig3_sizes=(256, 512),
                 conventional_sizes=(256, 512), default_layout_sizes=(512,), overhead_tiles=(128,), oracle_max=256)
    jobs = network_jobs("n", pts)
    assert jobs[Key("n", "streaming", 512, 128)] == {"fig2", "fig3"}
    assert Key("n", "conventional_default", 512, None) in jobs
    assert Key("n", "streaming", 512, 128, "one_thread") in jobs
    assert Key("n", "oracle", 256, None) in jobs and Key("n", "oracle", 512, None) not in jobs
    assert not any(k.mode == "conventional_default" for k in network_jobs("n", pts, default_layout_differs=False))
    assert all(g & {"fig2", "fig3"} for g in select(jobs, ["fig2", "fig3"]).values())
    with pytest.raises(ValueError, match="fig4"):
        select(jobs, ["fig4"])


def test_interleaved_order_is_seeded_and_mixes_modes():
    jobs = network_jobs("conv3", NETWORKS["conv3"].full)
    order = interleave(jobs, seed=0)
    assert order == interleave(jobs, seed=0) and sorted(order) == sorted(jobs)
    timed = [k for k in order if k.mode != "oracle"]
    assert all(k.mode == "oracle" for k in order[:len(order) - len(timed)])
    modes = [k.mode for k in timed]
    switches = sum(a != b for a, b in zip(modes, modes[1:]))
    assert switches > len(set(modes))  # measured in blocks, the mode would change only len(set) - 1 times
    assert [k.size for k in timed] != sorted(k.size for k in timed)


def test_headline_reps_limit_only_the_streamed_headline(tmp_path):
    cfg = dataclasses.replace(QUICK, raw_dir=tmp_path)
    runner = PointRunner(cfg, "cpu")
    pts = Points(fig2_input=64, fig2_tiles=(32,), fig3_tile=32, fig3_sizes=(64, 128),
                 conventional_sizes=(64,), headline_reps=1)
    assert runner.reps(Key("n", "streaming", 128, 32, "default"), pts) == (1, 1)
    assert runner.reps(Key("n", "streaming", 64, 32, "default"), pts) == (cfg.reps, cfg.max_steps)
    assert runner.reps(Key("n", "conventional", 128, None, "default"), pts) == (cfg.reps, cfg.max_steps)
    no_limit = dataclasses.replace(pts, headline_reps=None)
    assert runner.reps(Key("n", "streaming", 128, 32, "default"), no_limit) == (cfg.reps, cfg.max_steps)


def test_resume_keeps_only_clean_wanted_points_with_their_gradients(tmp_path):
    """--resume carries over what an interrupted run measured cleanly; everything else is measured again."""
    cfg = dataclasses.replace(QUICK, raw_dir=tmp_path)
    first = PointRunner(cfg, "cpu")
    clean, dirty, failed, lost, unwanted, skipped = (Key("conv3", "streaming", 64, t) for t in (8, 16, 24, 32, 40, 48))
    first.cache = {clean: {**clean._asdict(), "status": "measured", "clean": True},
                   dirty: {**dirty._asdict(), "status": "measured", "clean": False},
                   failed: {**failed._asdict(), "status": "failed", "reason": "killed"},
                   lost: {**lost._asdict(), "status": "measured", "clean": True},
                   unwanted: {**unwanted._asdict(), "status": "measured", "clean": True},
                   skipped: {**skipped._asdict(), "status": "skipped", "reason": "would not fit"}}
    first.save()
    for key in (clean, dirty, unwanted):
        Path(first.grads_path(key)).write_bytes(b"grads")
    resumed = PointRunner(cfg, "cpu", resume_keys=[clean, dirty, failed, lost, skipped])
    assert set(resumed.cache) == {clean, skipped} and resumed.resumed == 2
    assert all(p["resumed"] for p in resumed.cache.values())
    assert Path(resumed.grads_path(clean)).exists()
    assert not Path(resumed.grads_path(dirty)).exists() and not Path(resumed.grads_path(unwanted)).exists()
    fresh = PointRunner(cfg, "cpu")  # without --resume nothing is carried over
    assert fresh.cache == {} and not Path(fresh.grads_path(clean)).exists()


def test_memory_is_compared_by_the_fixed_mmap_probe_when_both_runs_have_it():
    ref = _results({**_p("streaming", 2048, 256, 4.0, 139), "fixed_mmap_peak_bytes": 132},
                   _p("streaming", 2048, 512, 4.0, 240))
    cur = _results({**_p("streaming", 2048, 256, 4.0, 149), "fixed_mmap_peak_bytes": 132.2},
                   {**_p("streaming", 2048, 512, 4.0, 250), "fixed_mmap_peak_bytes": 239})
    rows = {r["tile"]: r for r in compare.compare(cur, ref, "ref")["rows"]}
    probe, timed = rows[256], rows[512]
    assert probe["memory_measure"] == "fixed_mmap_peak_bytes" and probe["memory_ok"]
    assert probe["memory_ratio"] == pytest.approx(132.2 / 132) and probe["timed_memory_ratio"] == pytest.approx(149 / 139)
    assert timed["memory_measure"] == "peak_bytes"  # the reference has no probe: the timed peaks are compared
    assert timed["memory_ratio"] == pytest.approx(250 / 240) and timed["peak_bytes"] == 250


def _probe_runner(tmp_path, monkeypatch, device="cpu", worker_result=None):
    """A runner whose timed measurement is faked and whose workers are recorded (spec, extra environment)."""
    cfg = dataclasses.replace(QUICK, out_dir=tmp_path, raw_dir=tmp_path)
    calls = []

    def fake_worker(spec, timeout, log=None, extra_env=None):
        calls.append((spec, extra_env))
        return worker_result or _result(_step(5.0, peak=132))

    monkeypatch.setattr(harness, "run_worker", fake_worker)
    runner = PointRunner(cfg, device)
    monkeypatch.setattr(runner, "_measure", lambda key: {**key._asdict(), "status": "measured", "peak_bytes": 149})
    return runner, calls


def test_each_measured_default_point_gets_one_memory_probe_with_the_threshold_fixed(tmp_path, monkeypatch):
    runner, calls = _probe_runner(tmp_path, monkeypatch)
    point = runner.point(Key("conv3", "streaming", 512, 256))
    ((spec, env),) = calls
    assert env == FIXED_MMAP_ENV and env["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert spec["reps"] == spec["max_steps"] == 1 and spec["grads_path"] is None and spec["warmup"] == "full"
    assert point["fixed_mmap_peak_bytes"] == 132 and point["peak_bytes"] == 149  # the timed peak is kept
    runner.point(Key("conv3", "streaming", 512, 256))
    runner.point(Key("conv3", "streaming", 512, 128, "one_thread"))  # probes only the default variant
    assert len(calls) == 1
    assert json.loads((tmp_path / "points.json").read_text())[0]["fixed_mmap_peak_bytes"] == 132


def test_memory_probe_runs_for_carried_over_points_only_on_cpu_and_only_where_asked(tmp_path, monkeypatch):
    runner, calls = _probe_runner(tmp_path, monkeypatch)
    carried = Key("conv3", "conventional", 512, None)
    runner.cache[carried] = {**carried._asdict(), "status": "measured", "peak_bytes": 1, "resumed": True}
    assert runner.point(carried)["fixed_mmap_peak_bytes"] == 132
    runner.cache[Key("resnet34", "streaming", 640, 600)] = {"status": "measured"}
    runner.point(Key("resnet34", "streaming", 640, 600))  # its Points do not ask for the probe
    assert len(calls) == 1
    gpu, gpu_calls = _probe_runner(tmp_path / "gpu", monkeypatch, device="cuda")
    gpu.point(Key("conv3", "streaming", 512, 256))
    assert gpu_calls == []  # CUDA memory is torch's own allocator's: nothing to fix


def test_a_failed_memory_probe_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    runner, _ = _probe_runner(tmp_path, monkeypatch, worker_result={"error": "worker failed (exit code 1): boom"})
    point = runner.point(Key("conv3", "streaming", 512, 256))
    assert point["fixed_mmap_peak_bytes"] is None and "boom" in point["fixed_mmap_error"]
    assert run._exit_status({"networks": {"conv3": {"points": [point]}}}) == 1
    runner.save()
    again, calls = _probe_runner(tmp_path, monkeypatch)  # --resume: the failed probe is tried again
    again.cache = {Key("conv3", "streaming", 512, 256): point}
    fixed = again.point(Key("conv3", "streaming", 512, 256))
    assert len(calls) == 1 and fixed["fixed_mmap_peak_bytes"] == 132 and fixed["fixed_mmap_error"] is None
    assert run._exit_status({"networks": {"conv3": {"points": [fixed]}}}) == 0
