"""retry: any prompt with an answer, answered in several attempts with feedback after a wrong one.

    row: a prompt dataset's row (data.source: its `answer` column) or a built-in task's prompt
    reset  -> the prompt's messages (what single-turn GRPO sends)
    step   the model's final answer (the open-answer convention: <answer> tag, \\boxed{}, "The answer is N", else the
           last number; checked with math-verify, trainer/rl/math_answers.py) right, or `attempts` used -> over;
           else the feedback ("That is not correct. Try again.") and another turn
    reward {"solved": 1.0 if the last attempt is right, "first_try": 1.0 if the first was}

The feedback is all the environment says, so a second attempt can only do better by reconsidering: a multi-turn
task a small instruct model partly solves (SmolLM2-135M: docs/benchmarks/envs/README.md).
"""

from __future__ import annotations

from trainer.rl.tasks import open_correctness_reward

FEEDBACK = "That is not correct. Try again."


class RetryEnv:
    def __init__(self, attempts: int = 2, feedback: str = FEEDBACK):
        if attempts < 1:
            raise ValueError(f"rollout.env_args.attempts={attempts} must be >= 1")
        self.attempts, self.feedback = attempts, feedback

    def reset(self, row: dict) -> list[dict]:
        return [dict(m) for m in row["prompt_messages"]]

    @staticmethod
    def _right(message: dict, row: dict) -> bool:
        return open_correctness_reward(row["prompt"], message["content"], str(row["answer"])) == 1.0

    def step(self, messages: list[dict], row: dict) -> tuple[list[dict], bool]:
        attempts = sum(m["role"] == "assistant" for m in messages)
        if self._right(messages[-1], row) or attempts >= self.attempts:
            return [], True
        return [{"role": "user", "content": self.feedback}], False

    def reward(self, messages: list[dict], row: dict) -> dict[str, float]:
        replies = [m for m in messages if m["role"] == "assistant"]
        return {"solved": float(self._right(replies[-1], row)), "first_try": float(self._right(replies[0], row))}
