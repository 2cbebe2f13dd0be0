"""Load both example tasksets through vf.load_environment with the null harness + subprocess runtime, and build
the ModelContext cptrain would pass to run_episode. Runs no model, starts no server."""

import asyncio
import inspect

import verifiers.v1 as vf


def env_for(taskset_id: str, **taskset):
    config = vf.resolve_env_config({
        "taskset": {"id": taskset_id, **taskset},
        "agent": {"harness": {"id": "null"}, "runtime": {"type": "subprocess"},
                  "max_turns": 4, "max_total_tokens": 2048},
    })
    return config, vf.load_environment(config)


for tid in ("vf_arith", "vf_calc"):
    config, env = env_for(tid, num_tasks=3)
    print(tid, type(config).__name__, type(env).__name__, "env_id=", config.env_id)
    print("  agent harness:", config.agent.harness.id, type(config.agent.harness).__name__,
          "runtime:", config.agent.runtime.type, "max_turns:", config.agent.max_turns)
    print("  taskset:", type(env.taskset).__name__, "task type:", type(env.taskset).task_type().__name__)
    tasks = list(env.taskset)
    for t in tasks[:2]:
        print("  task", t.data.idx, repr(t.data.prompt), "answer", t.data.answer, "key", t.key[:12])
    print("  per-task toolsets:", [type(s).__name__ for s in type(tasks[0]).toolsets(tasks[0].config)])
    print("  reward hooks:", [f.__name__ for f in tasks[0].hooks("reward")],
          "metrics:", [f.__name__ for f in tasks[0].hooks("metric")])
    print("  runs local:", env._runs_local())

client = vf.TrainClientConfig(base_url="http://127.0.0.1:8765/v1", api_key_var="CPTRAIN_VERIFIERS_API_KEY",
                              renderer={"name": "default", "tool_parser": "qwen3"},
                              renderer_model_name="/path/to/model")
ctx = vf.ModelContext(model="cptrain-policy", client=client,
                      sampling=vf.SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=128, top_k=-1, seed=7,
                                                 cache_salt="cptrain-run-v3"))
print("client:", client.model_dump(exclude={"timeout"}))
print("sampling dump (what TrainClient sends, minus cache_salt):", ctx.sampling.model_dump(exclude_none=True))
print("run_episode signature:", inspect.signature(vf.Env.run_episode))
print("serving:", inspect.signature(vf.Env.serving))

# Reward on a fake trace, no model: the scoring path alone
_, env = env_for("vf_arith", num_tasks=1)
task = next(iter(env.taskset))
trace = vf.Trace(task=vf.TraceTask(type="ArithTask", data=task.data),
                 agent=vf.AgentInfo(config=vf.AgentConfig(model="m")),
                 root_reply=f"<answer>{task.data.answer}</answer>")
asyncio.run(task.score(trace))
print("fake-trace rewards:", trace.rewards, "reward:", trace.reward, "metrics:", trace.metrics)

# Enter and leave the serving context (starts verifiers' interception server on 127.0.0.1; no model, no harness)
from verifiers.v1.interception import requires_tunnel  # noqa: E402


async def serve_once(tid):
    _, env = env_for(tid, num_tasks=1)
    print(tid, "requires tunnel:", env._requires_tunnel({}))
    async with env.serving():
        print(tid, "serving: interception", type(env._interception).__name__)

for tid in ("vf_arith", "vf_calc"):
    asyncio.run(serve_once(tid))
