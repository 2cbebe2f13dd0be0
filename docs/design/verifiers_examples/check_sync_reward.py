import asyncio, verifiers.v1 as vf
class D(vf.TaskData): pass
class T(vf.Task[D]):
    @vf.reward
    def r(self, trace: vf.Trace) -> float: return 1.0
t = T(D(prompt="x"))
tr = vf.Trace(task=vf.TraceTask(type="T", data=t.data), agent=vf.AgentInfo(config=vf.AgentConfig(model="m")))
try:
    asyncio.run(t.score(tr)); print("sync ok", tr.rewards)
except Exception as e:
    print("sync reward fails:", type(e).__name__, str(e)[:200])
