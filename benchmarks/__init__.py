"""Benchmark tooling on top of the minitrain library (installed with it, editable).

Layers: `minitrain/` holds the techniques and the trainer; this package holds what measures and
reports them -- `harness` (machine metadata, atomic table writing), `ladder_runner` (train each
speed-ladder rung, validate, tabulate), `experiments` (distributed launch targets shared by
lessons 13-14, the animations and bench_distributed.py), `demo_figure` (the demo's plot) -- and
the `bench_*.py` scripts that `run_all.py` runs. Lessons and animations import from here;
`minitrain` never does.
"""
