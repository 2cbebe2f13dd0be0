"""Rollouts on the real model (issue 22): engine throughput, the learning runs, the TRL peer, the training half
vs SFT, weight sync vs model size, and the engine-trainer log-prob mismatch.

    python scripts/get_smollm2.py && scripts/install_vllm.sh          # the model and the vLLM venv
    scripts/install_trl_peer.sh                                       # optional: the TRL peer's venv
    python scripts/bench_rollout.py                                   # every part -> docs/benchmarks/rollout/
    python scripts/bench_rollout.py --parts engines sync              # some parts (the others kept from results.json)
    python scripts/bench_rollout.py --render                          # rewrite README.md from results.json

Parts, in this order (each alone on the machine; the whole run takes about 1.5 hours on 2 cores, most of it the
two learning runs):
    engines   rollout tokens/s: hf one generate per prompt (before), hf batched (now), vllm   (~6 min)
    learn     cptrain GRPO with rollout.engine=vllm, then =hf: held-out accuracy vs wall time  (~60 min)
    trl       TRL's GRPOTrainer on the same model, prompts and settings                       (~10 min)
    train     the GRPO training half vs SFT on the same tokens                                (~5 min)
    sync      weight sync time and bytes vs model size                                         (~8 min)
    mismatch  engine vs trainer log-probs, fp32 and bf16                                       (~10 min)
    async     async GRPO: rollout.max_off_policy_steps = 1, 2 with the vllm engine (k = 0 is learn's vllm run):
              step time, idle shares, the time to +15 points                                  (~40 min)
    lora      the vllm learning run with LoRA (rank 16, alpha 32, lr 1e-4; adapters-only sync)  (~17 min)
The parts are scripts/bench/rollout/; results.json keeps each part's numbers and the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository (trainer, cp, models)

from bench.provenance import code_state, command_line, machine, now  # noqa: E402
from bench.rollout import engines, learn, mismatch, report, sync, train  # noqa: E402
from bench.rollout.common import require_real_model  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "rollout"
PARTS = ("engines", "learn", "trl", "train", "sync", "mismatch", "async", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--learn-steps", type=int, default=15, help="optimizer steps of each learning run")
    p.add_argument("--learn-engines", nargs="+", choices=("vllm", "hf"), default=["vllm", "hf"])
    p.add_argument("--trl-steps", type=int, default=3)
    p.add_argument("--sizes", nargs="+", choices=sorted(sync.SIZES), default=list(sync.SIZES))
    p.add_argument("--sync-bucket-mb", type=float, default=64.0)
    p.add_argument("--render", action="store_true", help="only rewrite OUT/README.md from OUT/results.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    if args.render:
        report.render(args.out)
        print(f"rewrote {args.out / 'README.md'}")
        return
    require_real_model()
    results = json.loads(path.read_text()) if path.exists() else {}
    log = lambda text: print(text, flush=True)
    start = time.perf_counter()
    results["meta"] = {"command": command_line(__file__, argv), "date": now(), "machine": machine(),
                       "code_state": code_state(("trainer/rl/loop.py", "trainer/rl/rollout/vllm_engine.py",
                                                 "trainer/rl/rollout/weights/sync.py",
                                                 "trainer/rl/rollout/weights/file_transport.py"))}
    made = results.setdefault("made_by", {})  # part -> the command, date and commit that measured it
    for part in args.parts:
        log(f"{part}:")
        key = part if part != "learn" else f"learn {' '.join(args.learn_engines)}"
        made[key] = {"command": results["meta"]["command"], "date": now(),
                      "commit": results["meta"]["code_state"]["commit"]}
        if part == "engines":
            results["engines"] = engines.measure(n_prompts=4, group=8, max_new_tokens=128, log=log)
        elif part == "learn":
            kept = [r for r in results.get("learning", []) if r["engine"] not in args.learn_engines]
            results["learning"] = kept + [learn.run_cptrain(e, args.learn_steps, args.out, log)
                                          for e in args.learn_engines]
        elif part == "trl":
            results["trl"] = learn.run_trl(args.trl_steps, args.out, log)
        elif part == "train":
            results["train"] = train.measure(repeats=2, log=log)
        elif part == "sync":
            results["sync"] = sync.measure(args.sizes, repeats=3, bucket_mb=args.sync_bucket_mb, log=log)
            results["sync_bucket_mb"] = args.sync_bucket_mb
        elif part == "async":
            results["async"] = [learn.run_cptrain("vllm", args.learn_steps, args.out, log, k=k) for k in (1, 2)]
        elif part == "lora":
            results["lora"] = [learn.run_cptrain("vllm", args.learn_steps, args.out, log, extra=learn.LORA_RUN,
                                                 name="vllm_lora16")]
        elif part == "mismatch":
            results["mismatch"] = mismatch.measure([("float32", 4, 8, 48), ("bfloat16", 1, 4, 24)], log=log)
        path.write_text(json.dumps(results, indent=1))  # after every part: an interrupted run keeps what it made
    results["meta"]["elapsed_s"] = time.perf_counter() - start
    path.write_text(json.dumps(results, indent=1))
    report.render(args.out)
    log(f"wrote {args.out} in {results['meta']['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
