"""cptrain's CP benchmark (driven by scripts/bench_cp.py).

    bench_cp.py ──launch.py──> N ranks (gloo on CPU, NCCL on CUDA), each running sweep.run_rank:
        for workload (attention | model), for seq len S:
            configs (cp=1 baselines, ulysses / ring / hybrid at each cp, peers) built by
            workloads.py / peers.py, each a Runner whose step() processes S tokens per rank
            warm-up ─> timed repeats, configs interleaved (measure.StepTimer)
                   ─> one instrumented step each: bytes (cp.collectives.count_comm) and
                      time blocked in communication (measure.CommWait)
                   ─> one memory step each (measure.PeakMemory)
        rank 0 ─> results.json ─> report.py: markdown table + PNG plots in docs/benchmarks/

theory.py gives each style's minimum bytes (what the counted bytes are compared with).
"""
