"""Multi-turn verifiers v1 taskset with one MCP tool (vf.Toolset): multiply via a `multiply` tool.

The tool server runs as `python -m vf_calc.tool` (sys.executable) in the local subprocess runtime, so
vf_calc must be importable from any working directory (installed, or its parent on PYTHONPATH).
Tool calls need a renderer with a tool parser: TrainClientConfig(renderer={"name": "default",
"tool_parser": "qwen3"}) (or a model-specific renderer such as {"name": "qwen3"}).
"""

import random
import re

import verifiers.v1 as vf

from vf_calc.tool import CalcToolset


class CalcData(vf.TaskData):
    answer: str


class CalcTaskConfig(vf.TaskConfig):
    tools: vf.ToolsetConfig = vf.ToolsetConfig()  # runtime: SubprocessConfig() by default


class CalcTask(vf.Task[CalcData, vf.State, CalcTaskConfig]):
    @classmethod
    def toolsets(cls, config: CalcTaskConfig) -> list[vf.Toolset]:
        return [CalcToolset(config.tools)]  # one server per rollout (Taskset.toolsets: one shared server)

    @vf.reward(weight=1.0)
    async def correct(self, trace: vf.Trace) -> float:
        found = re.search(r"<answer>\s*(-?\d+)\s*</answer>", trace.last_reply)
        return float(found is not None and found.group(1) == self.data.answer)

    @vf.metric
    async def tool_calls(self, trace: vf.Trace) -> float:
        return float(len(trace.tool_messages))


class CalcConfig(vf.TasksetConfig):
    num_tasks: int = 64
    seed: int = 0
    task: CalcTaskConfig = CalcTaskConfig()


class CalcTaskset(vf.Taskset[CalcTask, CalcConfig]):
    def load(self) -> list[CalcTask]:
        rng = random.Random(self.config.seed)
        tasks = []
        for i in range(self.config.num_tasks):
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            tasks.append(CalcTask(
                CalcData(id=f"calc-{i}", answer=str(a * b),
                         prompt=f"Compute {a} * {b}. Use the multiply tool, then reply with <answer>N</answer>."),
                self.config.task))
        return tasks


__all__ = ["CalcTaskset"]
