"""Benchmarks for streamcnn: the paper's Figs. 2 and 3, per network, on the user's own machine.

    python -m bench                      # make bench: full run (~35 min for the paper's network on 2 quiet
                                         #   CPU cores), writes reports/
    python -m bench --quick              # make bench QUICK=1: smoke run (~5 min), writes reports/_raw/quick/
    python -m bench --repeat fig2,fig3   # make bench REPEAT=fig2,fig3: measure those points again, compare
    python -m bench --render-only        # recompute derived numbers from bench.json's points, redraw
    python -m bench --list               # the points a run would measure, in order

Every point runs in a fresh subprocess under a measurement protocol (bench.protocol): warm-up,
at least three undisturbed timed steps, load sampled before and during each step, disturbed
points measured again within bounds. Each registered network (bench.networks) gets its own
figure pair and BENCH.md section; every run ends by comparing its points with the committed
``reports/bench.json``. Scratch (gradients, worker logs, points.json, pytest-benchmark JSON)
goes to the git-ignored ``reports/_raw/``.

Modules:
    networks – registry of benchmarked networks, each with its own tile and size lists
    network  – the paper's three-convolution network and the seeded input
    config   – run settings and protocol parameters (full, quick)
    protocol – when a step is disturbed, when a point is measured again (pure rules, /proc sampling)
    memory   – peak resident-set / CUDA peak measurement
    machine  – machine description recorded with the results
    worker   – one measured point, run in a fresh subprocess
    guard    – plan() per point, skipping points that would not fit in memory
    harness  – launches workers, applies the protocol's re-measure rules
    jobs     – which points a run measures, interleaved
    fit      – weighted straight-line fits in pixels, R², flags
    analysis – fits, extrapolation, overlap, time breakdown, targets, gradient errors, quiet summary
    compare  – this run against the committed bench.json, point by point
    plots    – Figs. 2 and 3 per network
    fmt, report, report_network – render BENCH.md
    micro    – runs test_micro_reference.py (pytest-benchmark) and summarises it
    run      – orchestrates everything (``python -m bench``)
"""
