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

Modules, in layers that import one way (each from those listed above it; checked by
verify/test_layout.py), with the JSON records between measurement, derivation and rendering:
    shared       fmt (numbers and Markdown tables); network, networks, models (what is measured);
                 config (run settings, where results go)
    measurement  protocol – when a step is disturbed, when a point is measured again (pure rules, /proc sampling)
                 memory – peak resident-set / CUDA peak; machine – the machine, recorded with the results
                 worker – one point in a fresh subprocess; guard – plan() per point, skipping what won't fit
                 harness – launches workers, applies the protocol; jobs – which points a run measures
                 micro – runs test_micro_reference.py (pytest-benchmark) and summarises it
                 study – what the one-off studies share; slide, dedup, calibration, training_norm,
                 allocator, speed – each a study: its probe, its records and its BENCH.md section
    derivation   fit – weighted straight-line fits; compare – this run against the committed bench.json;
                 analysis – every derived number of a results dict (``rederive``)
    rendering    plots, dedup_plot – the figures; report_network, report – BENCH.md;
                 render – writes reports/ from a results dict, or re-renders it from the stored JSON
    command line run – ``python -m bench``; a study's own command line (``python -m bench.slide``) is
                 its ``__main__`` block, which hands BENCH.md's renderer to the study
"""
