"""Multi-turn environments, measured: what a long episode costs a rank to train (cp=1 vs cp=2), and a real model
learning in a multi-turn environment.

    python scripts/bench_envs.py memory [--episodes 2] [--sections 10] [--section-words 300] [--render]
        long_doc episodes (trainer/rl/envs/long_doc.py) run through the real episode runner and renderer against
        a scripted policy (read every section with the read_section tool, then answer): trajectories of thousands
        of tokens, most of them tool results (no loss), the model's calls and answer sampled (loss)
        -> one GRPO backward per episode (trainer/rl/training.py: packed, sharded, chunked head) on SmolLM2-135M's
           architecture (pretrained/smollm2-135m-instruct: scripts/get_smollm2.py), fp32, at cp=1 (world 1) and
           cp=2 Ulysses (world 2): the peak memory per rank above the step's start (scripts/bench/measure.py
           PeakMemory: activations, logits chunks, communication buffers; not weights or gradients)
        -> docs/benchmarks/envs/memory.json, memory.png and the table in docs/benchmarks/envs/README.md

    python scripts/bench_envs.py learn [--run outputs/rl_smollm2_retry]
        runs `torchrun --nproc-per-node 2 -m trainer.rl experiment=smollm2_retry` (unless the run's output
        directory already holds a finished run), then reads its eval.jsonl, metrics.jsonl and rollouts.jsonl
        -> docs/benchmarks/envs/learning.json, learning.png, samples.md (episodes showing the turns)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench.launch import spawn  # noqa: E402
from scripts.bench.provenance import code_state, command_line, machine, now  # noqa: E402

OUT = ROOT / "docs" / "benchmarks" / "envs"
MODEL = ROOT / "pretrained" / "smollm2-135m-instruct"


class ScriptedPolicy:
    """A rollout engine that answers every episode with the same script: read_section(0), ..., then the answer.
    Its turns are token ids (the tokenizer's encoding of the call text + the end of turn) with log-prob 0."""

    def __init__(self, tokenizer, sections: int, answer: str):
        from trainer.rl.rollout.base import stop_token_ids
        texts = [f'<tool_call>{{"name": "read_section", "arguments": {{"index": {i}}}}}</tool_call>'
                 for i in range(sections)] + [f"<answer>{answer}</answer>"]
        stop = stop_token_ids(tokenizer)[0]
        self.turns = [tokenizer(text, add_special_tokens=False)["input_ids"] + [stop] for text in texts]
        self.version, self.calls = 0, 0

    def sample(self, prompts, settings, routes=None):
        from trainer.rl.rollout.base import Completion
        ids = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        return [[Completion(list(ids), [0.0] * len(ids), 0) for _ in range(settings.n)] for _ in prompts]


def long_episodes(tokenizer, episodes: int, sections: int, words: int) -> list:
    """grpo.Rollouts of scripted long_doc episodes, as the runner builds them (environment tokens masked)."""
    from trainer.rl import grpo
    from trainer.rl.envs.long_doc import LongDocEnv
    from trainer.rl.episodes import Budgets, EpisodeRunner
    from trainer.rl.rollout.base import SamplingSettings, stop_token_ids
    rows = LongDocEnv.make_rows(episodes, seed=0)
    out = []
    for i, row in enumerate(rows):
        runner = EpisodeRunner(lambda: LongDocEnv(sections=sections, section_words=words), tokenizer,
                               stop_token_ids(tokenizer), Budgets(max_turns=sections + 1, max_new_tokens=64,
                                                                  max_episode_tokens=1 << 20))
        [e] = runner.run(ScriptedPolicy(tokenizer, sections, row["answer"]), [row],
                         SamplingSettings(n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0), routes=[0])
        runner.close()
        assert e.error is None and e.reward == 1.0, (e.error, e.reward)
        out.append(grpo.Rollout(e.prompt_ids, e.ids, [-1.0 if s else 0.0 for s in e.sampled], 1.0,
                                advantage=1.0 if i % 2 else -1.0, loss_mask=e.sampled, group=i // 2))
    return out


def _measure(rank: int, world: int, seq_len: int, episodes: int, sections: int, words: int) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from scripts.bench.measure import PeakMemory
    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.training import gather_cp_group, grpo_backward, micro_batches
    config.register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("rl", overrides=["model=smollm2", f"model.name={MODEL}", f"model.cp={world}",
                                       f"data.seq_len={seq_len}", "data.micro_batch_size=1", "wandb.mode=disabled",
                                       "data.max_tokens_per_rank=null",
                                       f"rollout.prompts_per_step={world}", "checkpoint.export_hf=false"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    rollouts = long_episodes(trainer.tokenizer, episodes, sections, words)
    peaks = []
    for rollout in rollouts:  # one episode per micro-batch: the per-rank peak of one long trajectory
        batches = micro_batches(cfg, trainer, gather_cp_group([rollout], trainer) if world > 1 else [rollout], 0)
        grpo_backward(cfg, trainer, batches)  # warm-up: gradient buffers exist before the measured step
        trainer.model.zero_grad(set_to_none=False)
        with PeakMemory(trainer.device) as peak:
            grpo_backward(cfg, trainer, batches)
        trainer.model.zero_grad(set_to_none=False)
        worst = torch.tensor(float(peak.bytes))
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        peaks.append(float(worst))
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    sampled = [r.sampled_count for r in rollouts]
    return {"cp": world, "episode_tokens": lengths, "sampled_tokens": sampled, "peak_bytes": peaks}


def render(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["runs"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = [f"cp={r['cp']}" for r in rows]
    values = [max(r["peak_bytes"]) / 2**20 for r in rows]
    ax.bar(labels, values, color=["#888", "#2a7"])
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:.0f} MiB", ha="center", va="bottom")
    ax.set_ylabel("peak memory per rank (MiB)")
    ax.set_ylim(0, max(values) * 1.15)
    ax.set_title(f"GRPO step, one long_doc episode ({max(rows[0]['episode_tokens'])} tokens),\nSmolLM2-135M fp32",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "memory.png", dpi=120)
    lines = ["| CP | episode tokens (sampled) | peak memory per rank |", "|---|---|---|"]
    for r in rows:
        episodes = ", ".join(f"{t} ({s})" for t, s in zip(r["episode_tokens"], r["sampled_tokens"]))
        lines.append(f"| {r['cp']} | {episodes} | {max(r['peak_bytes']) / 2**20:.0f} MiB |")
    (OUT / "memory_table.md").write_text("\n".join(lines) + "\n")


LEARN_COMMAND = ["torchrun", "--nproc-per-node", "2", "-m", "trainer.rl", "experiment=smollm2_retry",
                 "wandb.mode=disabled", "checkpoint.export_hf=false"]


def learn(run: Path, argv) -> None:
    """The learning run's curves and sample episodes (running it first if its directory has none)."""
    import subprocess

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not (run / "eval.jsonl").exists():
        subprocess.run(LEARN_COMMAND + [f"output_dir={run}", f"hydra.run.dir={run}/hydra"], check=True, cwd=ROOT)
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    episodes = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    keys = ("reward_mean", "reward_env_solved", "reward_env_first_try", "turns_mean", "env_token_frac",
            "truncated_frac", "episode_len_mean", "step_time_s", "generate_s", "train_s")
    results = {"command": " ".join(LEARN_COMMAND), "report": command_line(__file__, argv), "date": now(),
               "machine": machine(), "code_state": code_state(("trainer/rl/envs/retry.py", "trainer/rl/episodes.py")),
               "eval": evals, "steps": [{"step": s["step"], **{k: s.get(k) for k in keys}} for s in steps]}
    (OUT / "learning.json").write_text(json.dumps(results, indent=1) + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-", color="#2a7")
    left.set_xlabel("step")
    left.set_ylabel("held-out greedy episode reward (max 2)")
    left.set_ylim(0, 2)
    for key, label in (("reward_env_solved", "solved"), ("reward_env_first_try", "first try")):
        right.plot([s["step"] for s in steps], [s[key] for s in steps], label=label)
    right.set_xlabel("step")
    right.set_ylabel("training episodes (T=0.7)")
    right.set_ylim(0, 1)
    right.legend()
    fig.suptitle("SmolLM2-135M-Instruct, rollout.env=retry (2 attempts), cp=2, vLLM", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "learning.png", dpi=120)
    lines = []
    for e in [e for e in episodes if e["turns"] > 1][:2] + [e for e in episodes if e["turns"] == 1][:1]:
        lines.append(f"step {e['step']}, {e['turns']} turns, reward parts {e['reward_parts']}:\n")
        lines += [f"> **{m['role']}**: {m['content'].strip()}  " for m in e["messages"]]
        lines.append("")
    (OUT / "samples.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("memory", "learn"))
    parser.add_argument("--run", type=Path, default=ROOT / "outputs" / "rl_smollm2_retry")
    parser.add_argument("--render", action="store_true", help="redraw the plot and table from memory.json")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--sections", type=int, default=10)
    parser.add_argument("--section-words", type=int, default=300)
    args = parser.parse_args(argv)
    if args.part == "learn":
        OUT.mkdir(parents=True, exist_ok=True)
        return learn(args.run, argv)
    if args.render:
        render(json.loads((OUT / "memory.json").read_text()))
        return
    if not MODEL.exists():
        raise SystemExit(f"{MODEL} is missing: run python scripts/get_smollm2.py")
    OUT.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    lengths = [len(r.prompt_ids) + len(r.completion_ids)
               for r in long_episodes(tokenizer, args.episodes, args.sections, args.section_words)]
    seq_len = -(-max(lengths) // 256) * 256  # one episode per packed row
    runs = [spawn(_measure, world, "cpu", seq_len, args.episodes, args.sections, args.section_words)
            for world in (1, 2)]
    results = {"command": command_line(__file__, argv), "date": now(), "machine": machine(),
               "code_state": code_state(("trainer/rl/episodes.py", "trainer/rl/training.py")), "seq_len": seq_len,
               "runs": runs}
    (OUT / "memory.json").write_text(json.dumps(results, indent=1) + "\n")
    render(results)
    print(json.dumps({r["cp"]: [round(b / 2**20) for b in r["peak_bytes"]] for r in runs}))


if __name__ == "__main__":
    main()
