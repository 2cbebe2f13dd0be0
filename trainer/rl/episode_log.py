"""output_dir/rollouts.jsonl: what the model saw and did, per step (rank 0's first rollout.log_episodes episodes).

    one line per episode: {"step", "messages", "prompt_ids", "token_ids", "loss_mask", "logprobs", "versions",
                           "reward", "reward_parts", "turns", "truncated", "task"}
    token_ids follow prompt_ids; loss_mask / logprobs / versions are per token_ids entry (False / 0.0 / -1 on
    environment and template tokens): the trajectory exactly as it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path


class EpisodeLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, records: list[dict]) -> None:
        if not records:
            return
        with self.path.open("a") as f:
            for record in records:
                f.write(json.dumps({"step": step, **record}) + "\n")
