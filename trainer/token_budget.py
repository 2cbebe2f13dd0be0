"""Token-budget micro-batches and the CP degree of each (data.max_tokens_per_rank, model.cp_dynamic).

One optimizer step's documents (every dp replica's: the same documents the fixed-row loader would give the
step) are planned once, identically on every rank, into micro-batches that every rank runs in lock-step:

    documents (lengths n_i) of the whole step, world W = dp x cp, budget B tokens per rank per micro-batch
      degree of a document   the smallest d in `degrees` with n_i <= d * B   (static: degrees = [cp])
                             (a document longer than cp * B is refused at startup: data.seq_len bounds n_i)
      for each degree d, largest first: the documents of degree d into rows of at most d * B tokens, W / d rows
          per micro-batch (slot k = the k-th block of d ranks: cp.CPSubgroup.slot; W x B tokens per
          micro-batch at any degree), as few micro-batches as capacity allows, documents placed by decreasing
          cost on the least-loaded row with room (LPT), so every rank's share of each micro-batch costs about
          the same; when the spare room of the micro-batches already planned holds the class's partial last
          micro-batch, those (smallest) documents go there instead, at the higher degree: one micro-batch
          fewer (each costs FSDP's per-layer all-gathers and a pass through every layer)
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

import copy
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


@dataclass
class _Planned:
    """A micro-batch being planned: its degree and, per slot, the documents, tokens and cost of its row."""

    degree: int
    docs: list[list[int]]
    used: list[int]
    load: list[float]

    def room(self, r: int, budget: int) -> int:
        return self.degree * budget - self.used[r]

    def add(self, r: int, i: int, lengths, costs) -> None:
        self.docs[r].append(i)
        self.used[r] += lengths[i]
        self.load[r] += costs[i]


def _place(order: list[int], lengths, costs, degree: int, count: int, slots: int, budget: int) -> list[_Planned]:
    """LPT with capacity: `count` micro-batches of `slots` rows; each document (by decreasing cost) onto the
    least-loaded row with room."""
    planned = [_Planned(degree, [[] for _ in range(slots)], [0] * slots, [0.0] * slots) for _ in range(count)]
    rows = [(mb, r) for mb in planned for r in range(slots)]
    for i in order:
        fits = [(mb, r) for mb, r in rows if lengths[i] <= mb.room(r, budget)]
        if not fits:
            raise _Full
        mb, r = min(fits, key=lambda row: row[0].load[row[1]])
        mb.add(r, i, lengths, costs)
    return planned


def _placed(docs: list[int], lengths, costs, degree: int, world: int, budget: int) -> list[_Planned]:
    """`docs` (all of one degree) in as few micro-batches as _place manages, from the token lower bound up."""
    if not docs:
        return []
    order = sorted(docs, key=lambda i: (-costs[i], i))
    count = max(1, math.ceil(sum(lengths[i] for i in docs) / (world * budget)))
    while True:
        try:
            return _place(order, lengths, costs, degree, count, world // degree, budget)
        except _Full:
            count += 1


def _spill(docs: list[int], planned: list[_Planned], lengths, costs, budget: int, per_batch: int,
           largest_first: bool) -> list[int]:
    """Move documents of a lower degree into the spare room of the micro-batches already planned (they then run
    at that micro-batch's higher degree, on the row whose ranks stay least loaded) until the tokens beyond the
    class's whole micro-batches have moved; all or nothing. Returns the documents left to plan."""
    total = sum(lengths[i] for i in docs)
    overflow = total % per_batch  # the partial last micro-batch of this class
    if not overflow or sum(mb.room(r, budget) for mb in planned for r in range(len(mb.used))) < overflow:
        return docs
    moves, moved, room = [], 0, {(id(mb), r): mb.room(r, budget) for mb in planned for r in range(len(mb.used))}
    extra = {key: 0.0 for key in room}
    for i in sorted(docs, key=lambda i: (-lengths[i] if largest_first else lengths[i], i)):
        if moved >= overflow:
            break
        fits = [(mb, r) for mb in planned for r in range(len(mb.used)) if lengths[i] <= room[id(mb), r]]
        if not fits:
            continue
        mb, r = min(fits, key=lambda row: (row[0].load[row[1]] + extra[id(row[0]), row[1]] + costs[i]) / row[0].degree)
        room[id(mb), r] -= lengths[i]
        extra[id(mb), r] += costs[i]
        moves.append((mb, r, i))
        moved += lengths[i]
    if moved < overflow:
        return docs
    for mb, r, i in moves:
        mb.add(r, i, lengths, costs)
    taken = {i for _, _, i in moves}
    return [i for i in docs if i not in taken]


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
    planned: list[_Planned] = []
    per_batch = world * budget  # tokens one micro-batch holds, whatever its degree
    for degree in sorted(by_degree, reverse=True):
        docs, own = by_degree[degree], _placed(by_degree[degree], lengths, costs, degree, world, budget)
        for largest_first in (False, True):  # moving some into spare room: kept only if a micro-batch is saved
            trial = copy.deepcopy(planned)
            rest = _spill(docs, trial, lengths, costs, budget, per_batch, largest_first)
            placed = _placed(rest, lengths, costs, degree, world, budget)
            if len(placed) < len(own):
                planned, own = trial, placed
                break
        planned += own
    if not planned:  # nothing to train on this step: one pass of empty rows keeps FSDP in lock-step
        planned.append(_Planned(1, [[] for _ in range(world)], [0] * world, [0.0] * world))
    micro = [MicroBatchPlan(mb.degree, tuple(tuple(sorted(row)) for row in mb.docs)) for mb in planned]
    rank_costs = [[load / mb.degree for load in mb.load for _ in range(mb.degree)] for mb in planned]
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
