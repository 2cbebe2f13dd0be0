"""`python -m trainer.plan`: the memory planner's command line (its code: trainer/planning/memory_plan.py)."""

from trainer.planning.memory_plan import main

if __name__ == "__main__":
    main()
