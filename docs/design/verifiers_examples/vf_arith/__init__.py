"""Single-turn verifiers v1 taskset: add two numbers, answer in <answer></answer>.

Run with cptrain: rollout.env=verifiers:vf_arith (the directory holding this package on PYTHONPATH).
"""

import random
import re

import verifiers.v1 as vf


class ArithData(vf.TaskData):
    answer: str
    """The exact sum, as text."""


class ArithTask(vf.Task[ArithData]):
    # Rewards MUST be `async def`: Task.score gathers them with asyncio.gather
    # (verifiers/v1/utils/decorators.py invoke_all); arguments are injected by NAME
    # from {"task": <TaskData>, "trace": <Trace>, "runtime": <Runtime>}.
    @vf.reward(weight=1.0)
    async def correct(self, trace: vf.Trace) -> float:
        found = re.search(r"<answer>\s*(-?\d+)\s*</answer>", trace.last_reply)
        return float(found is not None and found.group(1) == self.data.answer)

    @vf.metric
    async def reply_chars(self, trace: vf.Trace) -> float:
        return float(len(trace.last_reply))


class ArithConfig(vf.TasksetConfig):
    num_tasks: int = 64
    seed: int = 0


class ArithTaskset(vf.Taskset[ArithTask, ArithConfig]):
    def load(self) -> list[ArithTask]:
        rng = random.Random(self.config.seed)
        tasks = []
        for i in range(self.config.num_tasks):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            tasks.append(ArithTask(
                ArithData(id=f"arith-{i}", prompt=f"What is {a} + {b}? Reply with <answer>N</answer>.",
                          system_prompt="You are a careful calculator.", answer=str(a + b)),
                self.config.task))
        return tasks


__all__ = ["ArithTaskset"]
