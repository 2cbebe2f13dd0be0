"""cptrain's benchmark package, shared by the benchmark commands (scripts/bench_cp.py, bench_dynamic_cp.py;
bench_memory.py uses its shared parts too). Each command parses its flags and calls in here.

Shared by the benchmarks:
    launch.py       spawn N local ranks (gloo on CPU, NCCL on CUDA) or join torchrun's; rank 0's value comes back
    measure.py      StepTimer (wall + CPU time after a barrier), CommWait, PeakMemory, median_se
    provenance.py   what made a result: command_line, now, machine / machine_line, code_state (commit, hashes)
    report.py       markdown_table (the rest of it is bench_cp.py's report, below)

bench_cp.py (CP throughput, memory, bytes, communication wait):

    bench_cp.py ──launch.py──> N ranks (gloo on CPU, NCCL on CUDA), each running sweep.run_rank:
        for workload (attention | model), for seq len S:
            configs (cp=1 baselines, ulysses / ring / hybrid at each cp, peers) built by
            workloads.py / peers.py, each a Runner whose step() processes S tokens per rank
            warm-up ─> timed repeats, configs interleaved (measure.StepTimer)
                   ─> one instrumented step each: bytes (cp.collectives.count_comm) and
                      time blocked in communication (measure.CommWait)
                   ─> one memory step each (measure.PeakMemory)
        rank 0 ─> results.json ─> report.py: markdown table + PNG plots in docs/benchmarks/

    sweep.py, workloads.py (also bench_memory.py's model and batches), peers.py, theory.py (each style's
    minimum bytes, what the counted bytes are compared with), hotspots.py, report.py's tables and plots.

bench_dynamic_cp.py (token-budget micro-batches and dynamic CP in the real SFT trainer): dynamic_cp/

    bench_dynamic_cp.py ─> dynamic_cp.run.measure: per (model, W) launch.spawn ─> every configuration's trainer
        on each rank, the steps interleaved (measure.StepTimer, PeakMemory) ─> dynamic_cp.report.write:
        summary.py (ratios, work ceiling, goals) ─> results.json, README.md in docs/benchmarks/dynamic_cp/
    dynamic_cp/workload.py (mixes, models, configurations, plans), run.py, summary.py, report.py.
"""
