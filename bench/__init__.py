"""tug's benchmark: live-migration strategies compared against a hand-made baseline.

Run from the repository root as ``python -m bench quick`` or ``python -m bench
full`` (see ``bench/__main__.py``). It is deliberately not installed with tug:
it drives the ``tug`` CLI and the lab exactly as a user would, so it measures
the product rather than library internals.

Modules, in the order a run flows through them:

* :mod:`bench.matrix`     what to run: strategies, workloads, links, reps.
* :mod:`bench.lab`        thin wrappers over ``tug lab ...`` (shaping, demo, check).
* :mod:`bench.proc`       child processes with their wall time and rusage.
* :mod:`bench.baselines`  the ``naive`` anchor: runc checkpoint + rsync + runc restore.
* :mod:`bench.runner`     one run: start, settle, migrate, measure, verify, clean up.
* :mod:`bench.conditions` the machine and software a result was measured on.
* :mod:`bench.report`     results.json, summary.md and the plots.
"""
