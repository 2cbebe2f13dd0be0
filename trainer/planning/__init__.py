"""Planning a run: what each micro-batch holds, and what memory a configuration needs.

    token_budget.py  token-budget micro-batches and dynamic CP degrees, cost-balanced over dp x cp ranks
    memory_plan.py   the memory planner (python -m trainer.plan): per-rank memory per cp / style / technique set
    memory_sim.py    its engine: the trainer's own step on the meta device in a fake process group
"""
