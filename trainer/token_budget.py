"""Token-budget micro-batches and the CP degree of each (data.max_tokens_per_rank, model.cp_dynamic).

One optimizer step's documents (every dp replica's: the same documents the fixed-row loader would give the
step) are planned once, identically on every rank, into micro-batches that every rank runs in lock-step:

    documents (lengths n_i) of the whole step, world W = dp x cp, budget B tokens per rank per micro-batch
      degree of a document   the smallest d in `degrees` with n_i <= d * B   (static: degrees = [cp])
                             (a document longer than cp * B is refused at startup: data.seq_len bounds n_i)
      for each degree d, largest first: the documents of degree d into rows of at most d * B tokens, W / d rows
          per micro-batch (slot k = the k-th block of d ranks: cp.CPSubgroup.slot), as few
          micro-batches as capacity allows, documents placed by decreasing cost on the least-loaded row with
          room (LPT), so every rank's share of each micro-batch costs about the same
      -> StepPlan: micro-batches [MicroBatchPlan(degree, rows: document indices per slot)], empty rows where
         a degree has fewer rows than slots (those ranks run empty_pass: a few pad tokens, nothing learned;
         FSDP's per-layer collectives need every rank in every micro-batch)

    cost of a document (CostModel, per rank it runs on: cost / d)
        per_token * n + per_pair * n^2 / 2      linear layers' FLOPs per token; causal attention's pairs,
                                                counted for full softmax-attention layers only (DeltaNet,
                                                Mamba2 and sliding-window layers are linear in n)
    imbalance = sum over micro-batches of the max rank cost / sum of the mean rank cost (1.0: no rank waits)

Every rank of the step computes the same plan from the same documents, so the number of micro-batches is
the same everywhere without a collective. The objective is unchanged: each rank's loss is its tokens' loss
sum over the step's GLOBAL token count and FSDP sums gradients over dp x cp, whichever rank a document ran on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import cp
from cp.documents import IGNORE_INDEX

FULL_ATTENTION_TYPES = ("full_attention", "attention")


@dataclass(frozen=True)
class CostModel:
    """Estimated cost (FLOPs, forward) of one document of n tokens: per_token * n + per_pair * n^2 / 2."""

    per_token: float
    per_pair: float

    def __call__(self, n: int) -> float:
        return self.per_token * n + self.per_pair * n * n / 2

    @classmethod
    def of(cls, *, params: int, heads: int, head_dim: int, attention_layers: int) -> CostModel:
        """2 x the parameters per token (the LM head included: an upper bound for the embedding), 4 x heads x
        head_dim per attention pair in each softmax-attention layer (QK^T and PV)."""
        return cls(per_token=2.0 * params, per_pair=4.0 * heads * head_dim * attention_layers)

    @classmethod
    def from_model(cls, model) -> CostModel:
        """From an HF CausalLM's parameters and config (layer_types: only full-attention layers are n^2)."""
        config = model.config
        config = getattr(config, "text_config", None) or config
        layers = config.num_hidden_layers
        kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
        heads = getattr(config, "num_attention_heads", 1)
        return cls.of(params=sum(p.numel() for p in model.parameters()), heads=heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                      attention_layers=sum(kind in FULL_ATTENTION_TYPES for kind in kinds))


@dataclass(frozen=True)
class MicroBatchPlan:
    """One micro-batch: its CP degree and, per slot (world / degree of them), the documents of its row."""

    degree: int
    rows: tuple[tuple[int, ...], ...]


@dataclass
class StepPlan:
    micro_batches: list[MicroBatchPlan]
    lengths: list[int]
    costs: list[float]
    world: int
    degrees: list[int]
    rank_costs: list[list[float]] = field(default_factory=list)  # [micro-batch][rank slot order]: cost per rank

    def rows_for(self, slot_of_degree: dict[int, int]) -> list[tuple[int, tuple[int, ...]]]:
        """This rank's (degree, documents of its row) in every micro-batch; slot_of_degree: {d: slot}."""
        return [(mb.degree, mb.rows[slot_of_degree[mb.degree]]) for mb in self.micro_batches]

    @property
    def imbalance(self) -> float:
        """Sum over micro-batches of the slowest rank's cost / of the mean rank cost (1.0 = perfect)."""
        slowest = sum(max(costs) for costs in self.rank_costs)
        mean = sum(sum(costs) / len(costs) for costs in self.rank_costs)
        return slowest / mean if mean else 1.0

    def degree_tokens(self) -> dict[int, int]:
        """Tokens planned at each CP degree."""
        tokens = Counter()
        for mb in self.micro_batches:
            tokens[mb.degree] += sum(self.lengths[i] for row in mb.rows for i in row)
        return dict(tokens)

    def metrics(self) -> dict:
        """cp_degree_<d>_frac (share of the step's tokens at degree d), micro_batches, load_imbalance."""
        tokens = self.degree_tokens()
        total = max(sum(tokens.values()), 1)
        return {"micro_batches": len(self.micro_batches), "load_imbalance": self.imbalance,
                **{f"cp_degree_{d}_frac": tokens.get(d, 0) / total for d in self.degrees}}


class _Full(Exception):
    pass


def degree_for(n: int, degrees: Sequence[int], budget: int) -> int:
    """The smallest degree whose ranks hold n tokens within `budget` tokens each."""
    for degree in sorted(degrees):
        if n <= degree * budget:
            return degree
    raise ValueError(f"a document of {n} tokens does not fit {max(degrees)} ranks x data.max_tokens_per_rank="
                     f"{budget}: raise data.max_tokens_per_rank to >= {math.ceil(n / max(degrees))} (or model.cp)")


def _place(order: list[int], lengths, costs, rows: int, capacity: int) -> list[list[int]]:
    """LPT with capacity: each document (by decreasing cost) onto the least-loaded row with room."""
    placed, load, used = [[] for _ in range(rows)], [0.0] * rows, [0] * rows
    for i in order:
        fits = [r for r in range(rows) if used[r] + lengths[i] <= capacity]
        if not fits:
            raise _Full
        row = min(fits, key=lambda r: (load[r], r))
        placed[row].append(i)
        load[row] += costs[i]
        used[row] += lengths[i]
    return placed


def plan_step(lengths: Sequence[int], *, world: int, degrees: Sequence[int], budget: int,
              cost: CostModel) -> StepPlan:
    """The micro-batches of one step (see the module docstring). lengths: every document of the step."""
    if budget < 1:
        raise ValueError(f"data.max_tokens_per_rank must be >= 1; got {budget}")
    lengths = [int(n) for n in lengths]
    costs = [cost(n) for n in lengths]
    by_degree: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_degree.setdefault(degree_for(n, degrees, budget), []).append(i)
    micro, rank_costs = [], []
    for degree in sorted(by_degree, reverse=True):
        docs = sorted(by_degree[degree], key=lambda i: (-costs[i], i))
        slots, capacity = world // degree, degree * budget
        count = max(1, math.ceil(sum(lengths[i] for i in docs) / capacity / slots))
        while True:
            try:
                rows = _place(docs, lengths, costs, count * slots, capacity)
                break
            except _Full:
                count += 1
        for m in range(count):
            chunk = rows[m * slots:(m + 1) * slots]
            micro.append(MicroBatchPlan(degree, tuple(tuple(sorted(row)) for row in chunk)))
            rank_costs.append([sum(costs[i] for i in row) / degree for row in chunk for _ in range(degree)])
    if not micro:  # nothing to train on this step: one pass of empty rows keeps FSDP in lock-step
        micro.append(MicroBatchPlan(1, ((),) * world))
        rank_costs.append([0.0] * world)
    return StepPlan(micro, lengths, costs, world, sorted(degrees), rank_costs)


@dataclass
class TokenBudget:
    """A run's token budget: the plan of each step and this rank's part of it.

    build(dims, model, budget, dynamic): degrees = the divisors of cp (dynamic) or cp alone, their process
    groups built (collective: at startup, on every rank)."""

    budget: int
    degrees: list[int]
    cost: CostModel
    world: int
    subgroups: dict  # {degree: cp.CPSubgroup of this rank}

    @classmethod
    def build(cls, dims, model, budget: int, *, dynamic: bool) -> TokenBudget:
        degrees = dims.cp_degrees() if dynamic else [dims.cp]
        return cls(budget, degrees, CostModel.from_model(model), dims.world_size, dims.build_subgroups(degrees))

    def plan(self, lengths: Sequence[int]) -> StepPlan:
        return plan_step(lengths, world=self.world, degrees=self.degrees, budget=self.budget, cost=self.cost)

    def my_rows(self, plan: StepPlan) -> list[tuple[object, tuple[int, ...]]]:
        """(this rank's CPSubgroup, documents of its row; empty: a zero-weight pass) per micro-batch."""
        return [(self.subgroups[degree], row)
                for degree, row in plan.rows_for({d: sub.slot for d, sub in self.subgroups.items()})]


EMPTY_PASS_TOKENS = 8


def empty_pass(device, pad_token_id: int) -> cp.CPBatch:
    """The shard of a rank whose row is empty in a micro-batch: a few pad tokens, nothing learned (every label
    ignored), on this rank alone (no CP group). Its forward and backward still run, so FSDP's per-layer
    collectives see every rank in every micro-batch; its gradient is zero."""
    ids = torch.full((1, EMPTY_PASS_TOKENS), pad_token_id, dtype=torch.long, device=device)
    return cp.setup_cp_params(ids, None, labels=torch.full_like(ids, IGNORE_INDEX), style="ulysses")
