"""RL prompts: built-in tasks or a user dataset, held-out eval prompts, and the sampler that serves them.

    built-in tasks (data.source=builtin, trainer/rl/tasks.py)
      make_eval_prompts(task, n, tok)   held-out prompts: every task of the mix in equal shares (bundled eval
                                        rows first, disjoint from the SFT rows; generated when they run out)
      make_prompts(task, n, seed, tok, exclude_prompts=eval) -> [Prompt(prompt, answer, input_ids, task)]
    a user dataset (.jsonl/.json/.parquet, "builtin:<asset file>", or an HF datasets name)
      load_rl_prompts(source, tok)      trainer/data/records.py read_rl_rows + prompt_messages: a `prompt` (text or
                                        messages) or `messages` column (trailing assistant turns dropped), the
                                        chat template applied; every other column rides along in
                                        Prompt.columns for the rewards
      split_eval_prompts(prompts, n)    the LAST n rows held out for eval, the rest train (disjoint by row)
    PromptSampler(prompts, batch_size, dp_rank, dp_size, seed).next_prompts()   this dp rank's prompts of a
                                        step; deterministic, resumable (a ShuffledCursor, like PackedLoader)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from trainer.data.chat import template_ids
from trainer.data.packing import ShuffledCursor, check_dp, check_same
from trainer.data.records import prompt_messages, read_builtin, read_rl_rows
from trainer.rl.tasks import SYSTEM_PROMPT, make_examples, task_components, task_messages
from trainer.data.tokenizer import load_tokenizer

_PROMPT_COLUMNS = ("prompt", "messages")  # what a dataset row's prompt is read from; other columns reach rewards


@dataclass(frozen=True)
class Prompt:
    """An RL prompt: the task text (what rewards see as `prompt`), its exact answer, and the chat
    token ids ending in the generation prompt ("<|im_start|>assistant\\n")."""

    prompt: str
    answer: str
    input_ids: list[int]
    task: str = ""
    columns: dict | None = field(default=None, compare=False)  # a user dataset's other columns (None: builtin)
    messages: tuple = field(default=(), compare=False)  # the chat messages input_ids render (() for env rows)

    def reward_columns(self) -> dict:
        """What rewards get as keyword columns: built-in tasks {answer, task}; a user dataset, its row's
        columns other than prompt / messages."""
        return {"answer": self.answer, "task": self.task} if self.columns is None else dict(self.columns)

    def env_row(self) -> dict:
        """What an environment gets as `row`: the prompt text, the reward columns and the prompt's chat
        messages (`prompt_messages`: what single-turn GRPO sends)."""
        return {"prompt": self.prompt, **self.reward_columns(), "prompt_messages": [dict(m) for m in self.messages]}


def task_prompt(tokenizer, example: dict, system_prompt: str | None) -> Prompt:
    """A built-in task example -> its Prompt ([system], user prompt; the generation prompt)."""
    messages = task_messages(example["prompt"], system_prompt=system_prompt)
    return Prompt(prompt=example["prompt"], answer=example["answer"], task=example["task"],
                  input_ids=template_ids(tokenizer, messages, add_generation_prompt=True), messages=tuple(messages))


def _to_prompts(examples: Sequence[dict], tokenizer, system_prompt: str | None) -> list[Prompt]:
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
    return [task_prompt(tokenizer, ex, system_prompt) for ex in examples]


def env_prompts(rows: Sequence[dict]) -> list[Prompt]:
    """A built-in environment's own rows (make_rows) -> Prompts without ids: the environment's reset gives the
    messages of each episode."""
    return [Prompt(prompt=str(row["prompt"]), answer=str(row.get("answer", "")), input_ids=[],
                   task=str(row.get("task", "")), columns={k: v for k, v in row.items() if k != "prompt"})
            for row in rows]


def make_prompts(task: str, n: int, seed: int, tokenizer=None, *, exclude_prompts: Collection[str] = (),
                 system_prompt: str | None = SYSTEM_PROMPT) -> list[Prompt]:
    """`n` prompts of a built-in task (trainer.rl.tasks), deterministic by seed; tokenizer None: builtin.
    The system prompt is the one the bundled SFT data uses, so an SFT model knows the answer format.
    exclude_prompts: prompt texts never drawn (the held-out eval prompts)."""
    return _to_prompts(make_examples(task, n, seed, exclude_prompts=exclude_prompts), tokenizer, system_prompt)


EVAL_TOP_UP_SEED = 7_919  # generated eval prompts, for tasks without (enough) bundled eval rows


def make_eval_prompts(task: str, n: int, tokenizer=None, *,
                      system_prompt: str | None = SYSTEM_PROMPT) -> list[Prompt]:
    """`n` held-out prompts of `task` covering every concrete task of a mix in equal shares (the first
    n % parts tasks get one more): the bundled eval rows of that task first (disjoint from the bundled
    SFT rows), then generated ones. Independent of the training seed; exclude them from the training
    pool with make_prompts(..., exclude_prompts=)."""
    parts = task_components(task)
    if n and n < len(parts):
        raise ValueError(f"{n} eval prompts cannot cover the {len(parts)} tasks of {task!r} ({', '.join(parts)})")
    bundled = read_builtin("eval")
    examples = []
    for i, part in enumerate(parts):
        share = n // len(parts) + (i < n % len(parts))
        chosen = list({r["prompt"]: {"task": part, "prompt": r["prompt"], "answer": r["answer"]}
                       for r in bundled if r["task"] == part}.values())[:share]
        if len(chosen) < share:
            chosen += make_examples(part, share - len(chosen), EVAL_TOP_UP_SEED + i,
                                    exclude_prompts={ex["prompt"] for ex in chosen})
        examples += chosen
    return _to_prompts(examples, tokenizer, system_prompt)


def load_eval_prompts(tokenizer=None, *, tasks: Sequence[str] | None = None, limit: int | None = None,
                      system_prompt: str | None = SYSTEM_PROMPT) -> list[Prompt]:
    """The bundled eval prompts (disjoint from the bundled SFT rows), optionally only some tasks."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
    rows = [r for r in read_builtin("eval") if tasks is None or r["task"] in tasks]
    rows = rows if limit is None else rows[:limit]
    return [task_prompt(tokenizer, r, system_prompt) for r in rows]


def rows_to_prompts(rows: Sequence[dict], tokenizer, *, source: str = "data",
                    system_prompt: str | None = None) -> list[Prompt]:
    """Dataset rows -> Prompts: the chat template applied to the prompt messages (generation prompt at
    the end); Prompt.prompt is the last user message, Prompt.answer the `answer` column ("" without one)."""
    prompts = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        messages = prompt_messages(row, where, system_prompt)
        columns = {k: v for k, v in row.items() if k not in _PROMPT_COLUMNS}
        answer = columns.get("answer")
        prompts.append(Prompt(prompt=messages[-1]["content"], answer="" if answer is None else str(answer),
                              input_ids=template_ids(tokenizer, messages, add_generation_prompt=True,
                                                     tools=row.get("tools")),
                              task=str(columns.get("task", "")), columns=columns, messages=tuple(messages)))
    return prompts


def load_rl_prompts(source: str, tokenizer, *, limit: int | None = None, system_prompt: str | None = None,
                    split: str = "train", subset: str | None = None) -> list[Prompt]:
    """RL prompts from a user dataset (see read_rl_rows and rows_to_prompts)."""
    rows = read_rl_rows(source, split=split, subset=subset, limit=limit)
    if not rows:
        raise ValueError(f"data.source={source!r} has no rows (data.limit={limit})")
    return rows_to_prompts(rows, tokenizer, source=source, system_prompt=system_prompt)


def split_eval_prompts(prompts: Sequence[Prompt], n: int) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, eval prompts): the LAST n rows are held out, the rest train (disjoint by row)."""
    if n < 0 or n >= len(prompts):
        raise ValueError(f"rollout.eval_prompts={n} must be >= 0 and leave training rows: the dataset has "
                         f"{len(prompts)} (its last rollout.eval_prompts rows are the eval set); lower it")
    return list(prompts[:len(prompts) - n]), list(prompts[len(prompts) - n:])


class PromptSampler:
    """Serves `batch_size` prompts per step to each dp rank, deterministic and resumable: one global
    stream over the prompts in a shuffled order (reshuffled each epoch); step k uses stream items
    [k*batch_size*dp, (k+1)*batch_size*dp) and dp rank r keeps items r, r + dp, ... of those."""

    def __init__(self, prompts: Sequence[Prompt], *, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0):
        check_dp(dp_rank, dp_size, batch_size)
        self.prompts = list(prompts)
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        self._order = ShuffledCursor(len(self.prompts), seed)
        self.steps = 0

    @property
    def epoch(self) -> int:
        """The epoch of the next batch's first item (for logging)."""
        return self._order.upcoming_epoch

    def next_prompts(self) -> list[Prompt]:
        """This dp rank's prompts for the next step."""
        step = [self._order.take() for _ in range(self.batch_size * self.dp_size)]
        self.steps += 1
        return [self.prompts[i] for i in step[self.dp_rank::self.dp_size]]

    def state_dict(self) -> dict:
        return {**self._order.state_dict(), "steps": self.steps, "seed": self.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        check_same(state, {"seed": self.seed, "num_prompts": len(self.prompts)}, "prompt sampler")
        self._order.load_state_dict(state)
        self.steps = int(state.get("steps", 0))
