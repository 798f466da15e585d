"""Benchmarks for streamcnn: the paper's Figs. 2 and 3 on the user's own machine.

    python -m bench                 # make bench: full run (~20–30 min on 2 quiet CPU cores), writes reports/
    python -m bench --quick         # make bench QUICK=1: smoke run (< 3 min), writes reports/_raw/quick/
    python -m bench --render-only   # redraw figures and BENCH.md from the last run's raw points

The full run measures streaming against conventional backpropagation for the
three-convolution network of the paper's Figs. 2–3 (each point in a fresh
subprocess), runs the reference micro-benchmarks, and writes
``reports/fig2_memory_vs_tile.png``, ``reports/fig3_time_vs_input.png``,
``reports/bench.json`` and ``reports/BENCH.md``. Scratch (gradients, worker logs,
points.json, pytest-benchmark JSON) goes to the git-ignored ``reports/_raw/``.

Modules:
    network  – the benchmarked network and its seeded input
    memory   – peak resident-set / CUDA peak measurement
    machine  – machine description recorded with the results
    worker   – one measured point, run in a fresh subprocess
    harness  – launches workers, guards points that would not fit in memory
    config   – the full and quick point lists
    analysis – extrapolation, overlap factors, time breakdown, targets, gradient errors
    plots    – Figs. 2 and 3
    report   – renders BENCH.md
    micro    – runs test_micro_reference.py (pytest-benchmark) and summarises it
    run      – orchestrates everything (``python -m bench``)
"""
