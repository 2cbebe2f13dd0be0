"""What bench_dynamic_cp.py runs: the length mixes, the models, the configurations and what the parent knows of them.

    MIXES ─> document_lengths (deterministic, scaled to data.seq_len) ─> make_docs (TokenizedDocs, in the ranks)
    (model, configuration, world) ─> overrides ─> compose (configs/sft.yaml + overrides, hydra)
    cells_of(opts): every (model, mix, world, configuration) to measure
    the parent, without running anything:
        step_tokens         the document lengths each step consumes (a shadow PackedLoader)
        plan_diagnostics    each step's token-budget plan, recomputed (trainer.planning.token_budget.plan_step):
                            micro-batches, fill, empty slots, layout
        top_degree_share    the share of tokens in documents that need degree W at the budget (the work ceiling)
        cost_model          the planner's CostModel of a model (for the report)
"""

from __future__ import annotations

import random
import statistics

# Length mixes: (share of documents, low, high) — lengths uniform in [low, high].
MIXES = {
    "long-tail": [(0.8, 64, 512), (0.2, 2048, 8192)],
    "uniform": [(1.0, 4096, 4096)],
}
MODELS = {
    "tiny_qwen3": ["model=tiny_qwen3", "model.cp_style=ulysses", "model.tiny_hidden_size=256", "model.tiny_layers=4"],
    "tiny_qwen3_5": ["model=tiny_qwen3_5", "model.cp_style=ulysses", "model.tiny_hidden_size=256",
                     "model.tiny_layers=4"],
}
CONFIGS = ("static", "budget", "dynamic", "dp-only")
UNIFORM_CONFIGS = ("static", "dynamic")


def scaled_mix(mix: str, seq_len: int) -> list[tuple[float, int, int]]:
    """The mix's length ranges scaled to seq_len (they are written for seq_len 8192)."""
    return [(share, max(2, low * seq_len // 8192), max(2, high * seq_len // 8192)) for share, low, high in MIXES[mix]]


def document_lengths(mix: str, seq_len: int, count: int, seed: int = 0) -> list[int]:
    """`count` lengths drawn from the mix (deterministic); the shares are exact, the order shuffled."""
    rng, lengths = random.Random(f"bench_dynamic_cp:{seed}"), []
    parts = scaled_mix(mix, seq_len)
    for k, (share, low, high) in enumerate(parts):
        n = count - len(lengths) if k == len(parts) - 1 else round(share * count)
        lengths += [rng.randint(low, high) for _ in range(n)]
    rng.shuffle(lengths)
    return lengths


def make_docs(lengths: list[int], vocab: int, seed: int = 0):
    """TokenizedDocs of the given lengths: random ids below the vocabulary, every token but the first a target."""
    from trainer.data.chat import TokenizedDoc

    rng = random.Random(f"bench_dynamic_cp:ids:{seed}")
    return [TokenizedDoc([rng.randrange(vocab) for _ in range(n)], [False] + [True] * (n - 1)) for n in lengths]


def overrides(model: str, config: str, world: int, seq_len: int, rows_per_step: int, steps: int,
              out_dir: str) -> list[str]:
    """Hydra overrides of one configuration. Every one consumes rows_per_step data.seq_len rows of documents
    per optimizer step: micro_batch_size 1, grad_accum x dp = rows_per_step."""
    cp_degree = 1 if config == "dp-only" else world
    grad_accum = rows_per_step // (world // cp_degree)
    items = [*MODELS[model], f"model.cp={cp_degree}", f"data.seq_len={seq_len}", "data.micro_batch_size=1",
             f"optim.grad_accum={grad_accum}", f"max_steps={steps}", "wandb.mode=disabled",
             "checkpoint.export_hf=false", f"output_dir={out_dir}", "overwrite=true"]
    if config in ("budget", "dynamic"):
        items.append(f"data.max_tokens_per_rank={seq_len // world}")
    if config == "dynamic":
        items.append("model.cp_dynamic=true")
    if config == "dp-only":
        items.append(f"data.max_tokens_per_rank={seq_len}")
    return items


def compose(items: list[str]):
    """configs/sft.yaml with the overrides (hydra's compose API, as trainer.plan.compose_run_config)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer import config
    from trainer.engine import CONFIG_DIR

    config.register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return hydra_compose(config_name="sft", overrides=items)


def step_tokens(lengths: list[int], seq_len: int, rows_per_step: int, steps: int) -> list[list[int]]:
    """The document lengths each step consumes: a shadow PackedLoader (same documents, seed and packing)."""
    from trainer.data.packing import PackedLoader

    loader = PackedLoader([([0] * n, [True] * n) for n in lengths], seq_len=seq_len, micro_batch_size=1,
                          dp_rank=0, dp_size=1, seed=0)
    return [[len(doc) for doc in loader.next_step_docs(rows_per_step)] for _ in range(steps)]


def top_degree_share(lengths: list[int], world: int, budget: int) -> float:
    """Share of the tokens in documents whose smallest degree (trainer.planning.token_budget.degree_for over the
    divisors of `world`) is `world` itself: no choice of degrees can run them with less CP communication."""
    from trainer.planning.token_budget import degree_for

    degrees = [d for d in range(1, world + 1) if world % d == 0]
    return sum(n for n in lengths if degree_for(n, degrees, budget) == world) / max(sum(lengths), 1)


def _cost_model_of(cfg):
    """trainer/planning/token_budget.py's CostModel of the composed configuration's model (its CP style)."""
    from trainer.data.tokenizer import load_tokenizer
    from trainer.modeling import build_model
    from trainer.planning.token_budget import CostModel

    return CostModel.from_model(build_model(cfg.model, len(load_tokenizer("builtin")), seed=0), cfg.model.cp_style)


def plan_diagnostics(items: list[str], world: int, step_lengths: list[list[int]]) -> list[dict] | None:
    """The token-budget plan of each step, recomputed here (trainer/planning/token_budget.py is deterministic):
    per step, micro-batches, the mean fill of a rank's share (tokens / data.max_tokens_per_rank over every rank of
    every micro-batch, empty rows counted as 0) and the share of (micro-batch, rank) slots that run an empty pass.
    None for fixed rows."""
    from trainer.planning.token_budget import plan_step

    cfg = compose(items)
    budget = cfg.data.max_tokens_per_rank
    if not budget:
        return None
    cost = _cost_model_of(cfg)
    degrees = [d for d in range(1, cfg.model.cp + 1) if cfg.model.cp % d == 0] if cfg.model.cp_dynamic else [
        cfg.model.cp]
    out = []
    for lengths in step_lengths:
        plan = plan_step(lengths, world=world, degrees=degrees, budget=budget, cost=cost)
        fills, empty = [], 0
        for mb in plan.micro_batches:
            for block in mb.blocks:
                tokens = sum(plan.lengths[i] for i in block.docs)
                fills += [tokens / block.degree / budget] * block.degree
                empty += block.degree * (not block.docs)
        out.append({"micro_batches": len(plan.micro_batches), "fill": statistics.fmean(fills),
                    "empty_slots": empty / len(fills),
                    "layout": [[[block.degree, sum(plan.lengths[i] for i in block.docs)] for block in mb.blocks]
                               for mb in plan.micro_batches]})
    return out


def cost_model(model: str, seq_len: int) -> dict:
    """The model's CostModel (trainer/planning/token_budget.py; every model here is Ulysses, the CostModel's
    default style) and the attention share of a seq_len document's cost."""
    cost = _cost_model_of(compose(MODELS[model]))
    return {"per_token": cost.per_token, "per_pair": cost.per_pair,
            "attention_share": cost.per_pair * seq_len ** 2 / 2 / cost(seq_len)}


def cells_of(opts: dict) -> list[dict]:
    """Every (model, mix, world, configuration) to measure."""
    cells = []
    for model, world in opts["runs"]:
        for config in CONFIGS:
            cells.append({"model": model, "mix": "long-tail", "world": world, "config": config})
        for config in UNIFORM_CONFIGS:
            cells.append({"model": model, "mix": "uniform", "world": world, "config": config})
    for cell in cells:
        cell["key"] = f"{cell['model']}/{cell['mix']}/w{cell['world']}/{cell['config']}"
    return cells
