"""guess_number: a multi-turn environment whose episodes need the feedback.

    row: {"prompt", "answer": the hidden number, "task": "guess_number", "low", "high"}
    reset  -> [system: the rules and the answer format, user: "I am thinking of a number between low and high"]
    step   the model's <answer>N</answer> (its last tagged number): equal -> no reply, over; else "Higher." /
           "Lower." (or "Answer with <answer>N</answer>." when it gave none), not over
    reward {"solved": 1.0 if the last guess is right, "efficiency": solved * (1 - (turns - 1) / max_guesses)}

A model that guesses blindly solves it with probability about max_guesses / range; one that uses the feedback
(binary search) within log2(range) turns.
"""

from __future__ import annotations

import random

from trainer.rl.tasks import extract_answer

RULES = ("Guess the hidden integer. Each turn, give one guess as <answer>N</answer>; you will be told whether the "
         "number is higher or lower.")


class GuessNumberEnv:
    def __init__(self, max_guesses: int = 6):
        self.max_guesses = max_guesses

    @classmethod
    def make_rows(cls, n: int, seed: int, *, low: int = 1, high: int = 20) -> list[dict]:
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            lo = rng.randint(low, high // 2)
            hi = lo + rng.randint(7, max(8, high - lo))
            rows.append({"prompt": f"I am thinking of a number between {lo} and {hi}. What is it?",
                         "answer": str(rng.randint(lo, hi)), "task": "guess_number", "low": lo, "high": hi})
        return rows

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "system", "content": RULES}, {"role": "user", "content": row["prompt"]}]

    @staticmethod
    def _guess(messages: list[dict]) -> int | None:
        text = extract_answer(messages[-1]["content"])
        try:
            return int(text.strip()) if text is not None else None
        except ValueError:
            return None

    def step(self, messages: list[dict], row: dict) -> tuple[list[dict], bool]:
        guess, target = self._guess(messages), int(row["answer"])
        if guess == target:
            return [], True
        hint = "Answer with <answer>N</answer>." if guess is None else ("Higher." if target > guess else "Lower.")
        return [{"role": "user", "content": hint}], False

    def reward(self, messages: list[dict], row: dict) -> dict[str, float]:
        solved = float(self._guess(messages) == int(row["answer"]))
        turns = sum(m["role"] == "assistant" for m in messages)
        return {"solved": solved, "efficiency": solved * max(0.0, 1 - (turns - 1) / self.max_guesses)}
