"""The token-budget / dynamic-CP benchmark (driven by scripts/bench_dynamic_cp.py; issue 13).

    bench_dynamic_cp.py (flags ─> opts) ─> run.measure:
        workload.py   mixes, models, configurations ─> per cell: overrides, each step's documents, plans
        run.py        one bench.launch.spawn per (model, W); every configuration's trainer in each rank, the
                      steps interleaved, timed with bench.measure.StepTimer / PeakMemory ─> cells, meta
    ─> report.write:
        summary.py    cells ─> summaries, ratios vs static, work ceiling, goals
        report.py     ─> results.json, README.md (tables via bench.report.markdown_table)

Shared with the other benchmarks: bench.launch (ranks), bench.measure (timing, memory, median_se),
bench.provenance (command, date, machine, code state), bench.report.markdown_table.
"""
