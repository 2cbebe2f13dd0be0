"""Data for the SFT and GRPO trainers: tokenizer, chat records, packing, RL prompts.

    Tokenizer (startup, before any collective)
    resolve_tokenizer_name(data.tokenizer, model.name)   auto -> builtin for tiny:*, else model.name
    load_tokenizer(name) ─> check_tokenizer_fits_model(tok, model)  ids < embedding rows, eos, chat template

    SFT
    load_sft_records(source)          "builtin" | file.jsonl/.json/.parquet | HF datasets name
      │  rows -> {"messages": [{"role", "content"}, ...]}   (prompt/completion pairs converted)
    tokenize_sft_records(tok, rows, max_len)
      │  tokenize_chat: chat template; loss mask = assistant tokens incl. their <|im_end|>
      v
    PackedLoader(docs, seq_len, micro_batch_size, dp_rank, dp_size, seed).next_batch()
         global row stream: docs in a shuffled order (reshuffled each epoch), packed greedily
         into rows of seq_len (a doc that does not fit starts the next row; leftover space is
         one pad document); each step takes micro_batch_size * dp_size rows and dp rank r
         keeps rows r, r + dp_size, ...  -> disjoint across dp, identical across a cp group
      └─> PackedBatch(input_ids [B, S], labels [B, S] shifted, seq_lens [[...] per row], num_loss_tokens)
              └─> cp.setup_cp_params(batch.input_ids, dims, labels=batch.labels, seq_lens=batch.seq_lens)

    RL
    make_eval_prompts(task, n, tok)   held-out prompts: every task of the mix in equal shares (bundled eval
                                      rows first, disjoint from the SFT rows; generated when they run out)
    make_prompts(task, n, seed, tok, exclude_prompts=eval) -> [Prompt(prompt, answer, input_ids, task)]
    load_rl_prompts(source, tok)      data.source = a user dataset (.jsonl/.json/.parquet, "builtin:<asset file>",
                                      or an HF datasets name): a `prompt` (text or messages) or `messages`
                                      column (trailing assistant turns dropped), the chat template applied;
                                      every other column rides along in Prompt.columns for the rewards
    split_eval_prompts(prompts, n)    the LAST n rows held out for eval, the rest train (disjoint by row)
    PromptSampler(prompts, batch_size, dp_rank, dp_size, seed).next_prompts()

Constraints: labels are shifted inside each document (labels[t] = input_ids[t+1] when t+1 is in
the same document and is a loss token, else -100), so no token learns across a document
boundary and the pad never contributes. Loaders are deterministic given (seed, docs) and
resumable from state_dict() = (epoch, cursor); every rank walks the same global stream.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cp.documents import IGNORE_INDEX  # the one definition (cp.documents)
from trainer.tasks import SYSTEM_PROMPT, make_examples, task_components, task_messages

TINY_MODEL_PREFIX = "tiny:"  # trainer.modeling.TINY_PREFIX (not imported: data must not import the model stack)
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
BUILTIN_SFT_FILES = {"train": ASSETS_DIR / "sft_tasks.jsonl", "eval": ASSETS_DIR / "eval_tasks.jsonl"}
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- tokenizer


def resolve_tokenizer_name(tokenizer: str | None, model_name: str) -> str:
    """data.tokenizer -> what load_tokenizer gets. "auto" (the default): the bundled tokenizer for a
    random-init tiny:* model (it has no tokenizer of its own), else the model's own (model.name, the
    same hub id or directory from_pretrained loads the weights from, with its chat template)."""
    if tokenizer in (None, "auto"):
        return "builtin" if model_name.startswith(TINY_MODEL_PREFIX) else model_name
    return tokenizer


def load_tokenizer(name_or_path: str | None = None):
    """None or "builtin": the bundled byte-level BPE tokenizer (offline); otherwise
    `AutoTokenizer.from_pretrained(name_or_path)` (an HF hub id or a local directory)."""
    from transformers import AutoTokenizer

    if name_or_path in (None, "builtin"):
        if not (BUILTIN_TOKENIZER_DIR / "tokenizer.json").is_file():
            raise FileNotFoundError(f"the bundled tokenizer is missing from {BUILTIN_TOKENIZER_DIR}: "
                                    "run `python scripts/make_assets.py` (or reinstall with the package data)")
        return AutoTokenizer.from_pretrained(str(BUILTIN_TOKENIZER_DIR))
    fix = "set data.tokenizer to the model's tokenizer (an HF id or a local directory with tokenizer files)"
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build an EMPTY tokenizer of the config's model type here, without complaint
        raise ValueError(f"{name_or_path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {name_or_path!r} ({err}): {fix}") from err
    if len(tokenizer) < 2:
        raise ValueError(f"the tokenizer loaded from {name_or_path!r} is empty ({len(tokenizer)} tokens): {fix}")
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the pad token, else the end-of-sequence token (a common convention: pad
    positions are their own document and never a loss target, so any in-range id is safe)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token: "
                     "set tokenizer.eos_token (the trainers end turns and stop generation at it)")


def check_tokenizer_fits_model(tokenizer, model, *, tokenizer_name: str, model_name: str) -> None:
    """Refuse, at startup, a tokenizer the model cannot use (DESIGN rule 11): an id past the input
    embedding table (it would index out of range or train rows that mean nothing), the bundled
    tokenizer next to a pretrained model (its ids are in range but meaningless), no eos token (SFT
    ends assistant turns with it, rollouts stop at it, padding falls back to it), no chat template."""
    rows = model.get_input_embeddings().num_embeddings
    size = max(max(tokenizer.get_vocab().values(), default=-1) + 1, len(tokenizer))
    own = "leave data.tokenizer=auto (the model's own tokenizer) or set it to the tokenizer the model was trained with"
    if size > rows:
        raise ValueError(f"data.tokenizer={tokenizer_name} has {size} token ids but model {model_name} has only {rows} "
                         f"input embedding rows (ids >= {rows} have no embedding): {own}")
    if tokenizer_name == "builtin" and not model_name.startswith(TINY_MODEL_PREFIX) and size != rows:
        raise ValueError(f"data.tokenizer=builtin ({size} tokens) is not the tokenizer of model {model_name} "
                         f"({rows} embedding rows): its ids would select arbitrary embeddings. {own}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"data.tokenizer={tokenizer_name} has no eos token, which the trainers need (assistant turns "
                         "end with it, rollouts stop at it, padding falls back to it): use a tokenizer with "
                         "eos_token set (e.g. save one with tokenizer.eos_token = '<|im_end|>')")
    _chat_template(tokenizer)


# ---------------------------------------------------------------- records


def _as_messages(value, role: str) -> list[dict]:
    """A prompt/completion field (a string, or already a list of messages) -> messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return list(value)


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: `messages` must be a non-empty list of {{'role', 'content'}} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} needs a string `role` and a string `content`; got {message!r}")
    return [dict(m) for m in messages]


def to_chat_record(row: dict, where: str = "row") -> dict:
    """A data row -> the row with `messages`: rows that have `messages` are checked; `prompt` +
    `completion` rows (strings or message lists) become user + assistant messages."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "completion" in row:
        messages = _as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant")
    else:
        raise ValueError(f"{where}: a row needs `messages` or `prompt` + `completion`; it has {sorted(row)}")
    return {**row, "messages": _check_messages(messages, where)}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
    return rows


def _read_json(path: Path) -> list[dict]:
    """A JSON array of rows (or an object holding one under "data"); JSON lines are accepted too."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of rows (or {{\"data\": [...]}})")
    return data


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    return pq.read_table(path).to_pylist()


def _looks_local(source: str) -> bool:
    return (Path(source).expanduser().exists() or source.endswith(_LOCAL_SUFFIXES)
            or source.startswith(("/", "./", "../", "~")))


def _read_local(source: str) -> list[dict]:
    path = Path(source).expanduser()
    if path.is_dir():
        raise ValueError(f"data source {source!r} is a directory: give one .jsonl, .json or .parquet file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {source!r} not found (local sources: a .jsonl, .json or .parquet file)")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise ValueError(f"{source!r}: unknown file type {path.suffix!r}; use .jsonl, .json or .parquet")
    return readers[path.suffix](path)


def _read_hf_dataset(name: str, split: str, subset: str | None, limit: int | None) -> list[dict]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"data source {name!r} is not a local file, so it is read as a Hugging Face dataset, "
                          "which needs the `datasets` package: pip install datasets "
                          "(or use a local .jsonl/.json/.parquet path, or 'builtin')") from err
    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # hub errors come in many types; name the usual causes once
        raise RuntimeError(f"could not load Hugging Face dataset {name!r} (subset={subset!r}, split={split!r}): "
                           f"{err}. Offline or a wrong name? Use a local .jsonl/.json/.parquet file "
                           "or 'builtin'.") from err
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [dict(row) for row in dataset]


def load_sft_records(source: str, *, split: str = "train", limit: int | None = None,
                     subset: str | None = None) -> list[dict]:
    """Chat rows (each with `messages`) from `source`:
    "builtin" (split "train": the bundled SFT rows; "eval": the bundled eval rows), a local
    .jsonl / .json / .parquet file (split ignored), or a Hugging Face `datasets` name (with
    `subset` as its config). limit: keep the first `limit` rows."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0; got {limit}")
    if source in (None, "builtin"):
        if split not in BUILTIN_SFT_FILES:
            raise ValueError(f"the builtin data has splits {', '.join(BUILTIN_SFT_FILES)}; got {split!r}")
        rows = _read_jsonl(BUILTIN_SFT_FILES[split])
        source = str(BUILTIN_SFT_FILES[split])
    elif _looks_local(source):
        rows = _read_local(source)
    else:
        rows = _read_hf_dataset(source, split, subset, limit)
    rows = rows if limit is None else rows[:limit]
    return [to_chat_record(row, f"{source} row {i}") for i, row in enumerate(rows)]


# ---------------------------------------------------------------- chat tokenisation


@dataclass(frozen=True)
class TokenizedDoc:
    """One tokenised conversation: token ids and which of them are training targets."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


def _chat_template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, which the "
                         "trainers format SFT rows and RL prompts with: set data.tokenizer to one that has a chat "
                         "template (an instruct model's, or builtin for tiny:* models)")
    return template if isinstance(template, str) else template.get("default", next(iter(template.values())))


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def _assistant_mask_by_prefixes(tokenizer, messages: list[dict], ids: list[int]) -> list[bool]:
    """For templates without {% generation %}: assistant turn i spans from the end of the
    rendering of messages[:i] + generation prompt to its own <eos> (or the end of messages[:i+1]).
    Needs the template to render a conversation's prefix as a prefix of its tokens."""
    mask = [False] * len(ids)
    eos = tokenizer.eos_token_id
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("a conversation that starts with an assistant turn needs a chat template with "
                             "{% generation %} blocks to locate the assistant tokens")
        before = _template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = _template_ids(tokenizer, messages[:i + 1])
        start, end = len(before), len(through)
        if ids[:start] != before or ids[:end] != through or start > end:
            raise ValueError("the chat template renders a conversation prefix differently from the whole "
                             "conversation, so assistant tokens cannot be located: use a template with "
                             "{% generation %} blocks (e.g. the builtin tokenizer)")
        if eos is not None and eos in through[start:end]:
            end = start + max(j for j, t in enumerate(through[start:end]) if t == eos) + 1
        mask[start:end] = [True] * (end - start)
    return mask


def tokenize_chat(tokenizer, messages: list[dict], max_len: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of `messages` through the tokenizer's chat template and the loss mask: True on
    assistant tokens (content and the closing <|im_end|>), False on system/user/template tokens.
    Both are truncated to max_len."""
    template = _chat_template(tokenizer)
    if _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    else:
        ids = _template_ids(tokenizer, messages)
        mask = _assistant_mask_by_prefixes(tokenizer, messages, ids)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def tokenize_sft_records(tokenizer, records: Sequence[dict], max_len: int | None = None) -> list[TokenizedDoc]:
    """tokenize_chat over records; rows left without any loss token (no assistant turn, or
    truncated away) are dropped with a warning."""
    docs = []
    for record in records:
        ids, mask = tokenize_chat(tokenizer, record["messages"], max_len)
        if any(mask):
            docs.append(TokenizedDoc(ids, mask))
    if len(docs) < len(records):
        log.warning("dropped %d of %d rows with no assistant token to train on", len(records) - len(docs), len(records))
    return docs


def shifted_labels(input_ids: Sequence[int], loss_mask: Sequence[bool]) -> list[int]:
    """labels[t] = input_ids[t+1] if token t+1 is a loss token, else -100; the last is -100."""
    if not input_ids:
        return []
    labels = [int(input_ids[t + 1]) if loss_mask[t + 1] else IGNORE_INDEX for t in range(len(input_ids) - 1)]
    return labels + [IGNORE_INDEX]


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

    def advance(self) -> None:
        self.cursor += 1

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


def _check_dp(dp_rank: int, dp_size: int, batch_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size; got dp_rank={dp_rank}, dp_size={dp_size}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size}")


def _check_same(state: dict, expected: dict, what: str) -> None:
    for key, value in expected.items():
        if key in state and state[key] != value:
            raise ValueError(f"cannot resume the {what}: {key} was {state[key]} when saved, now {value} "
                             "(the data, seq_len and seed must match the saved run)")


# ---------------------------------------------------------------- SFT packing


@dataclass(frozen=True)
class PackedBatch:
    """This dp rank's micro-batch of packed rows."""

    input_ids: torch.Tensor  # [B, seq_len] int64
    labels: torch.Tensor  # [B, seq_len] int64, already shifted; -100 where nothing is learned
    seq_lens: list[list[int]]  # per row: document lengths (the pad document last), summing to seq_len
    num_loss_tokens: int  # labels != -100 in this batch (this rank only)


class PackedLoader:
    """Packs tokenised documents into rows of `seq_len` and serves micro-batches, deterministic
    and resumable. Every rank walks the same global row stream (so one state fits all ranks);
    step k uses rows [k*B*dp, (k+1)*B*dp) and dp rank r keeps rows r, r + dp, ... of those."""

    def __init__(self, docs: Sequence[TokenizedDoc | tuple[Sequence[int], Sequence[bool]]], *, seq_len: int,
                 micro_batch_size: int = 1, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 pad_token_id: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1; got {seq_len}")
        _check_dp(dp_rank, dp_size, micro_batch_size)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.pad_token_id = dp_rank, dp_size, seed, pad_token_id
        self._docs = [doc for doc in map(self._truncated, docs) if len(doc)]  # empty documents dropped
        self.num_tokens = sum(len(doc) for doc in self._docs)
        self._order = ShuffledCursor(len(self._docs), seed)
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
        """Document indices of the next row of the global stream: greedy in the shuffled order;
        a document that does not fit starts the next row; an epoch's end closes the row."""
        row, used = [], 0
        while True:
            index = self._order.peek()
            if index is None:
                if row:
                    return row
                self._order.next_epoch()
                continue
            if used + len(self._docs[index]) > self.seq_len:
                return row  # not empty: every document fits in an empty row
            row.append(index)
            used += len(self._docs[index])
            self._order.advance()

    def _pack_row(self, doc_indices: list[int]) -> tuple[list[int], list[int], list[int]]:
        ids, labels, lens = [], [], []
        for index in doc_indices:
            doc = self._docs[index]
            ids += doc.input_ids
            labels += shifted_labels(doc.input_ids, doc.loss_mask)
            lens.append(len(doc))
        pad = self.seq_len - len(ids)
        if pad:  # leftover space: one pad document, nothing learned
            ids += [self.pad_token_id] * pad
            labels += [IGNORE_INDEX] * pad
            lens.append(pad)
        return ids, labels, lens

    def next_batch(self) -> PackedBatch:
        """The next micro-batch of this dp rank: [micro_batch_size, seq_len]."""
        rows = [self._next_row() for _ in range(self.micro_batch_size * self.dp_size)]
        packed = [self._pack_row(row) for row in rows[self.dp_rank::self.dp_size]]
        self.steps += 1
        input_ids = torch.tensor([p[0] for p in packed], dtype=torch.long)
        labels = torch.tensor([p[1] for p in packed], dtype=torch.long)
        return PackedBatch(input_ids=input_ids, labels=labels, seq_lens=[p[2] for p in packed],
                           num_loss_tokens=int((labels != IGNORE_INDEX).sum()))

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
        _check_same(state, {"seed": self.seed, "seq_len": self.seq_len, "num_docs": len(self._docs),
                            "num_tokens": self.num_tokens}, "packed loader")
        self._order.load_state_dict(state)
        self.steps = int(state.get("steps", 0))


# ---------------------------------------------------------------- RL prompts


@dataclass(frozen=True)
class Prompt:
    """An RL prompt: the task text (what rewards see as `prompt`), its exact answer, and the chat
    token ids ending in the generation prompt ("<|im_start|>assistant\\n")."""

    prompt: str
    answer: str
    input_ids: list[int]
    task: str = ""
    columns: dict | None = field(default=None, compare=False)  # a user dataset's other columns (None: builtin)

    def reward_columns(self) -> dict:
        """What rewards get as keyword columns: built-in tasks {answer, task}; a user dataset, its row's
        columns other than prompt / messages."""
        return {"answer": self.answer, "task": self.task} if self.columns is None else dict(self.columns)


def encode_prompt(tokenizer, prompt: str, *, system_prompt: str | None = SYSTEM_PROMPT) -> list[int]:
    """Chat-template token ids of [system], user `prompt`, then the assistant generation prompt."""
    return _template_ids(tokenizer, task_messages(prompt, system_prompt=system_prompt), add_generation_prompt=True)


def _to_prompts(examples: Sequence[dict], tokenizer, system_prompt: str | None) -> list[Prompt]:
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
    return [Prompt(prompt=ex["prompt"], answer=ex["answer"], task=ex["task"],
                   input_ids=encode_prompt(tokenizer, ex["prompt"], system_prompt=system_prompt)) for ex in examples]


def make_prompts(task: str, n: int, seed: int, tokenizer=None, *, exclude_prompts: Collection[str] = (),
                 system_prompt: str | None = SYSTEM_PROMPT) -> list[Prompt]:
    """`n` prompts of a built-in task (trainer.tasks), deterministic by seed; tokenizer None: builtin.
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
    bundled = _read_jsonl(BUILTIN_SFT_FILES["eval"])
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
    rows = [r for r in _read_jsonl(BUILTIN_SFT_FILES["eval"]) if tasks is None or r["task"] in tasks]
    rows = rows if limit is None else rows[:limit]
    return [Prompt(prompt=r["prompt"], answer=r["answer"], task=r["task"],
                   input_ids=encode_prompt(tokenizer, r["prompt"], system_prompt=system_prompt)) for r in rows]


BUILTIN_ASSET_PREFIX = "builtin:"  # data.source=builtin:<file> reads trainer/assets/<file>
_PROMPT_COLUMNS = ("prompt", "messages")


def _prompt_messages(row: dict, where: str, system_prompt: str | None) -> list[dict]:
    """A row's prompt as chat messages ending in a user turn (reference assistant turns dropped)."""
    if "prompt" in row:
        messages = _as_messages(row["prompt"], "user")
        if system_prompt and isinstance(row["prompt"], str):
            messages = [{"role": "system", "content": system_prompt}] + messages
    elif "messages" in row:
        messages = list(row["messages"])
    else:
        raise ValueError(f"{where}: an RL prompt row needs a `prompt` (text or messages) or a `messages` column; "
                         f"it has {sorted(row)}")
    messages = _check_messages(messages, where)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt must end with a user message (after dropping assistant turns)")
    return messages


def read_rl_rows(source: str, *, split: str = "train", subset: str | None = None,
                 limit: int | None = None) -> list[dict]:
    """Rows of an RL prompt dataset: "builtin:<file>" (trainer/assets), a local file, or an HF dataset."""
    if source.startswith(BUILTIN_ASSET_PREFIX):
        rows = _read_local(str(ASSETS_DIR / source[len(BUILTIN_ASSET_PREFIX):]))
    elif _looks_local(source):
        rows = _read_local(source)
    else:
        rows = _read_hf_dataset(source, split, subset, limit)
    return rows if limit is None else rows[:limit]


def rows_to_prompts(rows: Sequence[dict], tokenizer, *, source: str = "data",
                    system_prompt: str | None = None) -> list[Prompt]:
    """Dataset rows -> Prompts: the chat template applied to the prompt messages (generation prompt at
    the end); Prompt.prompt is the last user message, Prompt.answer the `answer` column ("" without one)."""
    prompts = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        messages = _prompt_messages(row, where, system_prompt)
        columns = {k: v for k, v in row.items() if k not in _PROMPT_COLUMNS}
        answer = columns.get("answer")
        prompts.append(Prompt(prompt=messages[-1]["content"], answer="" if answer is None else str(answer),
                              input_ids=_template_ids(tokenizer, messages, add_generation_prompt=True),
                              task=str(columns.get("task", "")), columns=columns))
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
        _check_dp(dp_rank, dp_size, batch_size)
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
        _check_same(state, {"seed": self.seed, "num_prompts": len(self.prompts)}, "prompt sampler")
        self._order.load_state_dict(state)
        self.steps = int(state.get("steps", 0))
