"""Token-budget micro-batches and the CP degree of each (data.max_tokens_per_rank, model.cp_dynamic).

One optimizer step's documents (every dp replica's: the same documents the fixed-row loader would give the
step) are planned once, identically on every rank, into micro-batches that every rank runs in lock-step:

    documents (lengths n_i) of the whole step, world W = dp x cp, budget B tokens per rank per micro-batch
      degree of a document   the smallest d in `degrees` with n_i <= d * B   (static: degrees = [cp])
                             (a document longer than cp * B is refused at startup: data.seq_len bounds n_i)
      rows                   per degree d: its documents in as few rows of d * B tokens as LPT with capacity
                             manages (by decreasing cost onto the least-loaded row with room), so rows of one
                             degree cost about the same
      micro-batches          rows by decreasing cost per rank, each into the first micro-batch with a free
                             block of d rank positions aligned to d (block k of degree d = cp.CPSubgroup.slot k:
                             positions k*d .. k*d + d - 1; the block that breaks the fewest free larger blocks):
                             world 4 can run a degree-2 block beside two degree-1 rows; free positions
                             are empty blocks (those ranks run empty_pass: a few pad tokens, nothing learned;
                             FSDP's per-layer collectives need every rank in every micro-batch)
      fewer passes           a micro-batch moves whole into the spare room of the other micro-batches' rows
                             when its documents fit and what they then move in CP communication at those rows'
                             degrees costs less than the pass's FSDP all-gathers (CostModel, in elements);
                             those that leave ranks idle are tried first, and any left spread their degree-1
                             documents over the idle ranks
      -> StepPlan: micro-batches [MicroBatchPlan(blocks: Block(degree, slot, documents) tiling the W positions)]

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
from dataclasses import dataclass, field, replace

import torch

import cp
from cp.documents import IGNORE_INDEX

FULL_ATTENTION_TYPES = ("full_attention", "attention")


@dataclass(frozen=True)
class CostModel:
    """Estimated cost of one document of n tokens: compute per_token * n + per_pair * n^2 / 2 (FLOPs, forward),
    and what a pass and CP cost in communication (elements moved; the compute dtype's size cancels out):

        gathered_per_pass     the elements FSDP all-gathers for one micro-batch (forward, and again for the
                              backward): 2 x parameters, of which a rank receives (world - 1) / world
        cp_elements(n, d)     what one rank of a degree-d block moves for n tokens of its row: Ulysses
                              all-to-alls q, k, v, out forward and their gradients backward, (d - 1) / d of
                              each shard's n / d tokens; ring: its KV shard passed d - 1 times forward and
                              KV + dKV backward
    """

    per_token: float
    per_pair: float
    gathered_per_pass: float = 0.0
    cp_token_elements: float = 0.0  # per token and layer stack: Ulysses 2 x (q, k, v, out); ring 3 x (k, v)
    ring: bool = False

    def __call__(self, n: int) -> float:
        return self.per_token * n + self.per_pair * n * n / 2

    def cp_elements(self, n: int, degree: int) -> float:
        if degree == 1:
            return 0.0
        shard = n / degree
        return shard * self.cp_token_elements * ((degree - 1) if self.ring else (degree - 1) / degree)

    def pass_elements(self, world: int) -> float:
        return self.gathered_per_pass * (world - 1) / world

    @classmethod
    def of(cls, *, params: int, heads: int, head_dim: int, attention_layers: int, kv_heads: int | None = None,
           mixer_layers: int | None = None, style: str = "ulysses") -> CostModel:
        """2 x the parameters per token (the LM head included: an upper bound for the embedding), 4 x heads x
        head_dim per attention pair in each softmax-attention layer (QK^T and PV); CP communication counted
        with attention's head shapes in every token-mixing layer (DeltaNet and Mamba2 mixers move projections
        of about that size under Ulysses)."""
        kv_heads = kv_heads or heads
        mixer_layers = attention_layers if mixer_layers is None else mixer_layers
        ring = style == "ring"
        per_layer = 3 * 2 * kv_heads * head_dim if ring else 2 * (2 * heads + 2 * kv_heads) * head_dim
        return cls(per_token=2.0 * params, per_pair=4.0 * heads * head_dim * attention_layers,
                   gathered_per_pass=2.0 * params, cp_token_elements=float(per_layer * mixer_layers), ring=ring)

    @classmethod
    def from_model(cls, model, style: str = "ulysses") -> CostModel:
        """From an HF CausalLM's parameters and config (layer_types: only full-attention layers are n^2)."""
        config = model.config
        config = getattr(config, "text_config", None) or config
        layers = config.num_hidden_layers
        kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
        heads = getattr(config, "num_attention_heads", 1)
        return cls.of(params=sum(p.numel() for p in model.parameters()), heads=heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                      attention_layers=sum(kind in FULL_ATTENTION_TYPES for kind in kinds),
                      kv_heads=getattr(config, "num_key_value_heads", None), mixer_layers=layers, style=style)


@dataclass(frozen=True)
class Block:
    """A block of `degree` consecutive rank positions running one row of documents (no documents: an empty
    pass). A rank's position is its cp group's index x cp + its rank in the group, so CPSubgroup.slot at degree
    d is position // d and this block holds positions slot * degree .. slot * degree + degree - 1."""

    degree: int
    slot: int
    docs: tuple[int, ...]

    @property
    def positions(self) -> range:
        return range(self.slot * self.degree, (self.slot + 1) * self.degree)


@dataclass(frozen=True)
class MicroBatchPlan:
    """One micro-batch: blocks that tile the world's rank positions, each at its own degree."""

    blocks: tuple[Block, ...]

    @property
    def rows(self) -> tuple[tuple[int, ...], ...]:
        """The documents of each block, in position order."""
        return tuple(block.docs for block in self.blocks)


@dataclass
class StepPlan:
    micro_batches: list[MicroBatchPlan]
    lengths: list[int]
    costs: list[float]
    world: int
    degrees: list[int]

    def rows_for(self, slot_of_degree: dict[int, int]) -> list[tuple[int, tuple[int, ...]]]:
        """This rank's (degree, documents of its block) in every micro-batch; slot_of_degree: {d: its slot}."""
        return [next((b.degree, b.docs) for b in mb.blocks if slot_of_degree[b.degree] == b.slot)
                for mb in self.micro_batches]

    @property
    def rank_costs(self) -> list[list[float]]:
        """[micro-batch][rank position]: the planned cost each rank runs (its block's cost / degree)."""
        out = []
        for mb in self.micro_batches:
            costs = [0.0] * self.world
            for block in mb.blocks:
                for position in block.positions:
                    costs[position] = sum(self.costs[i] for i in block.docs) / block.degree
            out.append(costs)
        return out

    @property
    def imbalance(self) -> float:
        """Sum over micro-batches of the slowest rank's cost / of the mean rank cost (1.0 = perfect)."""
        rank_costs = self.rank_costs
        slowest = sum(max(costs) for costs in rank_costs)
        mean = sum(sum(costs) / len(costs) for costs in rank_costs)
        return slowest / mean if mean else 1.0

    def degree_tokens(self) -> dict[int, int]:
        """Tokens planned at each CP degree."""
        tokens = Counter()
        for mb in self.micro_batches:
            for block in mb.blocks:
                tokens[block.degree] += sum(self.lengths[i] for i in block.docs)
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
class _Row:
    """A row being planned: its degree, documents, tokens and cost."""

    degree: int
    docs: list[int] = field(default_factory=list)
    used: int = 0
    load: float = 0.0

    def room(self, budget: int) -> int:
        return self.degree * budget - self.used

    def add(self, i: int, lengths, costs) -> None:
        self.docs.append(i)
        self.used += lengths[i]
        self.load += costs[i]

    @property
    def rank_load(self) -> float:
        return self.load / self.degree


def _rows(docs: list[int], lengths, costs, degree: int, budget: int, at_least: int = 1) -> list[_Row]:
    """`docs` (all of one degree) in as few rows of degree * budget tokens as LPT with capacity manages (from
    the token lower bound, or `at_least`, up): each document, by decreasing cost, onto the least-loaded row
    with room."""
    if not docs:
        return []
    order = sorted(docs, key=lambda i: (-costs[i], i))
    count = max(at_least, math.ceil(sum(lengths[i] for i in docs) / (degree * budget)))
    while True:
        rows = [_Row(degree) for _ in range(count)]
        try:
            for i in order:
                fits = [row for row in rows if lengths[i] <= row.room(budget)]
                if not fits:
                    raise _Full
                min(fits, key=lambda row: row.load).add(i, lengths, costs)
            return rows
        except _Full:
            count += 1


def _free_start(taken: list[bool], degree: int, degrees: Sequence[int]) -> int | None:
    """The first position of a free aligned block of `degree` in a micro-batch (taken: per position), the one
    that breaks the fewest free aligned blocks of the larger degrees (buddy placement); None: no room."""
    best = None
    for start in range(0, len(taken), degree):
        if any(taken[start:start + degree]):
            continue
        broken = sum(not any(taken[s:s + d]) for d in degrees if d > degree for s in [start - start % d])
        if best is None or broken < best[0]:
            best = (broken, start)
    return None if best is None else best[1]


def _assemble(rows: list[_Row], world: int, degrees: Sequence[int]) -> list[list[tuple[int, _Row]]]:
    """Rows into micro-batches of `world` positions: by decreasing per-rank cost (so rows of similar cost run
    side by side), each into the first micro-batch with a free aligned block of its degree. [(start, row)]"""
    batches: list[tuple[list[bool], list[tuple[int, _Row]]]] = []
    for row in sorted(rows, key=lambda r: (-r.rank_load, -r.degree, r.docs)):
        for taken, placed in batches:
            start = _free_start(taken, row.degree, degrees)
            if start is not None:
                break
        else:
            taken, placed = [False] * world, []
            batches.append((taken, placed))
            start = _free_start(taken, row.degree, degrees)
        taken[start:start + row.degree] = [True] * row.degree
        placed.append((start, row))
    return [placed for _, placed in batches]


def _drop_one(batches: list[list[tuple[int, _Row]]], world: int, lengths, costs, budget: int,
              cost: CostModel) -> bool:
    """Move every document of one micro-batch into the spare room of the others' rows (largest first, each onto
    the row whose ranks stay least loaded), so it need not run, when what its documents then move in CP
    communication at the higher degrees costs less than the pass's all-gathers (cost.pass_elements): the
    micro-batches that leave ranks idle first, lightest first. All or nothing; True when one was removed."""
    def order(k):
        return sum(row.degree for _, row in batches[k]) == world, sum(row.used for _, row in batches[k])

    for k in sorted(range(len(batches)), key=order):
        others = [row for j, placed in enumerate(batches) if j != k for _, row in placed]
        trial = {id(row): replace(row, docs=list(row.docs)) for row in others}
        moving = sorted(((i, row.degree) for _, row in batches[k] for i in row.docs), key=lambda m: (-lengths[m[0]], m[0]))
        extra = 0.0
        for i, degree in moving:
            fits = [row for row in trial.values() if lengths[i] <= row.room(budget)]
            if not fits:
                break
            row = min(fits, key=lambda row: (row.load + costs[i]) / row.degree)
            row.add(i, lengths, costs)
            extra += cost.cp_elements(lengths[i], row.degree) - cost.cp_elements(lengths[i], degree)
        else:
            if extra > cost.pass_elements(world):
                continue
            for placed in batches:
                placed[:] = [(start, trial.get(id(row), row)) for start, row in placed]
            del batches[k]
            return True
    return False


def _spread_over_idle_ranks(placed: list[tuple[int, _Row]], world: int, lengths, costs, budget: int) -> None:
    """A micro-batch that leaves ranks idle: its degree-1 rows' documents re-planned (LPT) over those rows and
    the idle positions, so the pass ends sooner."""
    taken = {p for start, row in placed for p in range(start, start + row.degree)}
    idle = [p for p in range(world) if p not in taken]
    ones = [(start, row) for start, row in placed if row.degree == 1]
    if not idle or not ones:
        return
    docs = [i for _, row in ones for i in row.docs]
    rows = _rows(docs, lengths, costs, 1, budget, at_least=min(len(ones) + len(idle), len(docs)))
    if len(rows) > len(ones) + len(idle):  # LPT with capacity needed more rows than there are ranks: keep it
        return
    placed[:] = [(start, row) for start, row in placed if row.degree != 1]
    placed += zip(sorted([start for start, _ in ones] + idle), rows)


def plan_step(lengths: Sequence[int], *, world: int, degrees: Sequence[int], budget: int,
              cost: CostModel) -> StepPlan:
    """The micro-batches of one step (see the module docstring). lengths: every document of the step."""
    if budget < 1:
        raise ValueError(f"data.max_tokens_per_rank must be >= 1; got {budget}")
    lengths = [int(n) for n in lengths]
    costs = [cost(n) for n in lengths]
    degrees = sorted(degrees)
    by_degree: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_degree.setdefault(degree_for(n, degrees, budget), []).append(i)
    rows = [row for degree in sorted(by_degree, reverse=True)
            for row in _rows(by_degree[degree], lengths, costs, degree, budget)]
    batches = _assemble(rows, world, degrees)
    while len(batches) > 1 and _drop_one(batches, world, lengths, costs, budget, cost):
        pass
    if degrees[0] == 1:
        for placed in batches:
            _spread_over_idle_ranks(placed, world, lengths, costs, budget)
    if not batches:  # nothing to train on this step: one pass of empty blocks keeps FSDP in lock-step
        batches = [[]]
    unit = degrees[0]
    micro = []
    for placed in batches:
        blocks = {start: Block(row.degree, start // row.degree, tuple(sorted(row.docs))) for start, row in placed}
        taken = {p for start, row in placed for p in range(start, start + row.degree)}
        blocks.update({start: Block(unit, start // unit, ()) for start in range(0, world, unit) if start not in taken})
        micro.append(MicroBatchPlan(tuple(blocks[start] for start in sorted(blocks))))
    return StepPlan(micro, lengths, costs, world, degrees)


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
        return cls(budget, degrees, CostModel.from_model(model, dims.cp_style), dims.world_size,
                   dims.build_subgroups(degrees))

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
