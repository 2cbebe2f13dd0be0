"""Packing documents into rows of seq_len, and the deterministic, resumable order the loaders walk.

    next_fit_rows(lengths, seq_len)   the one packing rule (SFT rows and GRPO rollouts alike): documents in
                                      order, a document that does not fit the current row starts the next
      ─> rows of document indices
    assemble_row(docs, seq_len, pad)  one row: the documents' columns concatenated, the leftover space one
      ─> (columns, seq_lens)          pad document (its own document, nothing learned); seq_lens sum to seq_len

    SFT: PackedLoader(docs, seq_len, micro_batch_size, dp_rank, dp_size, seed).next_batch()
         global row stream: docs in a ShuffledCursor order (reshuffled each epoch), next_fit_rows over
         each epoch (an epoch's end closes the row); each step takes micro_batch_size * dp_size rows
         and dp rank r keeps rows r, r + dp_size, ...  -> disjoint across dp, identical across a cp group
      └─> PackedBatch(input_ids [B, S], labels [B, S] shifted, seq_lens [[...] per row], num_loss_tokens,
                      step_tokens: document tokens of every dp rank's rows)
              └─> cp.setup_cp_params(batch.input_ids, dims, labels=batch.labels, seq_lens=batch.seq_lens)
    GRPO: trainer/rl/grpo.py pack_rollouts (prompt + completion documents, same two functions)

Labels are shifted inside each document (trainer/data/chat.py shifted_labels), so no token learns across
a document boundary and the pad never contributes. Loaders are deterministic given (seed, docs) and
resumable from state_dict() = (epoch, cursor); every rank walks the same global stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from cp.documents import IGNORE_INDEX  # the one definition (cp.documents)
from trainer.data.chat import TokenizedDoc, shifted_labels

# ---------------------------------------------------------------- packing


def next_fit_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Indices of the documents of `lengths` (in order) grouped into rows of at most seq_len tokens,
    next-fit: a document that does not fit the current row closes it and starts the next one."""
    rows, current, used = [], [], 0
    for index, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"a document of {n} tokens does not fit data.seq_len={seq_len}")
        if used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += n
    if current:
        rows.append(current)
    return rows


def assemble_row(docs: Sequence[dict[str, list]], seq_len: int, pad: dict) -> tuple[dict[str, list], list[int]]:
    """One packed row from documents given as columns of equal length ({"input_ids": [...], ...}): each
    column concatenated, then the leftover space as one pad document, column c filled with pad[c].
    Returns (columns, seq_lens: each document's length, the pad document's last)."""
    row, seq_lens = {name: [] for name in pad}, []
    for doc in docs:
        for name in pad:
            row[name] += doc[name]
        seq_lens.append(len(doc["input_ids"]))
    leftover = seq_len - sum(seq_lens)
    if leftover:
        for name, value in pad.items():
            row[name] += [value] * leftover
        seq_lens.append(leftover)
    return row, seq_lens


def sft_row(docs: Sequence[TokenizedDoc], seq_len: int, pad_token_id: int) -> tuple[dict[str, list], list[int]]:
    """One SFT row: the documents' ids and shifted labels (assemble_row; the pad document fills to seq_len)."""
    return assemble_row([{"input_ids": doc.input_ids, "labels": shifted_labels(doc.input_ids, doc.loss_mask)}
                         for doc in docs], seq_len, {"input_ids": pad_token_id, "labels": IGNORE_INDEX})


# ---------------------------------------------------------------- deterministic, resumable order


class ShuffledCursor:
    """A walk over range(n) in a shuffled order, reshuffled every epoch; its position is (epoch, cursor).
    The order of an epoch depends only on (seed, epoch, n)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("nothing to iterate over: the data is empty")
        self.n, self.seed = n, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"cptrain:{self.seed}:{epoch}").shuffle(order)  # str seeds hash with sha512: stable
        return order

    @property
    def upcoming_epoch(self) -> int:
        """The epoch the next index comes from (the next one once this epoch is used up)."""
        return self.epoch + (self.cursor >= self.n)

    def peek(self) -> int | None:
        """The next index of this epoch, or None at the end of the epoch."""
        return self._order[self.cursor] if self.cursor < self.n else None

    def rest(self) -> list[int]:
        """The indices this epoch has left, in order."""
        return self._order[self.cursor:]

    def advance(self, count: int = 1) -> None:
        self.cursor += count

    def next_epoch(self) -> None:
        self.epoch, self.cursor = self.epoch + 1, 0
        self._order = self._shuffled(self.epoch)

    def take(self) -> int:
        """The next index, moving to the next epoch when this one is done."""
        if self.peek() is None:
            self.next_epoch()
        index = self.peek()
        self.advance()
        return index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.n:
            raise ValueError(f"bad data position epoch={epoch} cursor={cursor} for {self.n} items")
        self.epoch, self.cursor = epoch, cursor
        self._order = self._shuffled(epoch)


def check_dp(dp_rank: int, dp_size: int, batch_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size; got dp_rank={dp_rank}, dp_size={dp_size}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size}")


def check_same(state: dict, expected: dict, what: str) -> None:
    """A saved position is only valid for the data it was saved with."""
    for key, value in expected.items():
        if key in state and state[key] != value:
            raise ValueError(f"cannot resume the {what}: {key} was {state[key]} when saved, now {value} "
                             "(the data, seq_len and seed must match the saved run)")


# ---------------------------------------------------------------- SFT loader


@dataclass(frozen=True)
class PackedBatch:
    """This dp rank's micro-batch of packed rows."""

    input_ids: torch.Tensor  # [B, seq_len] int64
    labels: torch.Tensor  # [B, seq_len] int64, already shifted; -100 where nothing is learned
    seq_lens: list[list[int]]  # per row: document lengths (the pad document last), summing to seq_len
    num_loss_tokens: int  # labels != -100 in this batch (this rank only)
    step_tokens: int = 0  # document tokens (no padding) of this micro-batch's rows on ALL dp ranks


class PackedLoader:
    """Packs tokenised documents into rows of `seq_len` and serves micro-batches, deterministic
    and resumable. Every rank walks the same global row stream (so one state fits all ranks);
    step k uses rows [k*B*dp, (k+1)*B*dp) and dp rank r keeps rows r, r + dp, ... of those."""

    def __init__(self, docs: Sequence[TokenizedDoc | tuple[Sequence[int], Sequence[bool]]], *, seq_len: int,
                 micro_batch_size: int = 1, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 pad_token_id: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1; got {seq_len}")
        check_dp(dp_rank, dp_size, micro_batch_size)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.pad_token_id = dp_rank, dp_size, seed, pad_token_id
        self._docs = [doc for doc in map(self._truncated, docs) if len(doc)]  # empty documents dropped
        self.num_tokens = sum(len(doc) for doc in self._docs)
        self._order = ShuffledCursor(len(self._docs), seed)
        self._rows = None  # the rows this epoch has left from the cursor, made when first needed
        self.steps = 0

    def _truncated(self, doc) -> TokenizedDoc:
        ids, mask = (doc.input_ids, doc.loss_mask) if isinstance(doc, TokenizedDoc) else doc
        if len(ids) != len(mask):
            raise ValueError(f"a document has {len(ids)} ids but {len(mask)} loss-mask entries")
        return TokenizedDoc([int(t) for t in ids[:self.seq_len]], [bool(m) for m in mask[:self.seq_len]])

    @property
    def epoch(self) -> int:
        """The epoch of the next batch's first item (for logging)."""
        return self._order.upcoming_epoch

    def _next_row(self) -> list[int]:
        """Document indices of the next row of the global stream: next_fit_rows over the rest of this
        epoch's shuffled order (the cursor is always at a row start); an epoch's end closes the row."""
        if self._order.peek() is None:
            self._order.next_epoch()
            self._rows = None
        if self._rows is None:
            rest = self._order.rest()
            self._rows = iter([[rest[j] for j in row]
                               for row in next_fit_rows([len(self._docs[i]) for i in rest], self.seq_len)])
        row = next(self._rows)
        self._order.advance(len(row))
        return row

    def _pack_row(self, doc_indices: list[int]) -> tuple[dict[str, list], list[int]]:
        return sft_row([self._docs[index] for index in doc_indices], self.seq_len, self.pad_token_id)

    def next_batch(self) -> PackedBatch:
        """The next micro-batch of this dp rank: [micro_batch_size, seq_len]."""
        rows = [self._next_row() for _ in range(self.micro_batch_size * self.dp_size)]
        packed = [self._pack_row(row) for row in rows[self.dp_rank::self.dp_size]]
        self.steps += 1
        input_ids = torch.tensor([row["input_ids"] for row, _ in packed], dtype=torch.long)
        labels = torch.tensor([row["labels"] for row, _ in packed], dtype=torch.long)
        return PackedBatch(input_ids=input_ids, labels=labels, seq_lens=[seq_lens for _, seq_lens in packed],
                           num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
                           step_tokens=sum(len(self._docs[index]) for row in rows for index in row))

    def next_step_docs(self, micro_batches: int) -> list[TokenizedDoc]:
        """Token-budget steps (data.max_tokens_per_rank): every document of the rows that `micro_batches`
        next_batch() calls would give ALL dp ranks, in order, for trainer/planning/token_budget.py to re-plan. Same
        position bookkeeping as next_batch, so a run resumes identically in either mode."""
        rows = [self._next_row() for _ in range(self.micro_batch_size * self.dp_size * micro_batches)]
        self.steps += micro_batches
        return [self._docs[index] for row in rows for index in row]

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Plain ints: the position (epoch, cursor, steps) and what it is only valid for."""
        return {**self._order.state_dict(), "steps": self.steps, "seed": self.seed, "seq_len": self.seq_len,
                "num_docs": len(self._docs), "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (micro_batch_size and dp_size may differ from the saved run,
        but then the batches differ from an uninterrupted run)."""
        check_same(state, {"seed": self.seed, "seq_len": self.seq_len, "num_docs": len(self._docs),
                           "num_tokens": self.num_tokens}, "packed loader")
        self._order.load_state_dict(state)
        self._rows = None
        self.steps = int(state.get("steps", 0))
