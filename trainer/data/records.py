"""Data rows from where the user keeps them, and rows -> chat messages.

    source: "builtin" (trainer/data/assets) | "builtin:<file>" (RL) | file.jsonl / .json / .parquet | HF datasets name
      ─ load_sft_records ─> [{"messages": [{"role", "content"}, ...], ...}]   (to_chat_record: prompt/completion
                                                                               pairs become user + assistant turns)
      ─ read_rl_rows ─> raw rows; prompt_messages(row) ─> the prompt as messages ending in a user turn
                        (reference assistant turns dropped, optional system turn before a text prompt)
    read_builtin(split)   the bundled rows: "train" (SFT conversations), "eval" (held-out prompts and answers)
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_SFT_FILES = {"train": ASSETS_DIR / "sft_tasks.jsonl", "eval": ASSETS_DIR / "eval_tasks.jsonl"}
BUILTIN_ASSET_PREFIX = "builtin:"  # data.source=builtin:<file> reads trainer/data/assets/<file>
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


# ---------------------------------------------------------------- rows -> messages


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


def prompt_messages(row: dict, where: str, system_prompt: str | None) -> list[dict]:
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


# ---------------------------------------------------------------- readers


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


def _read_file_or_hub(source: str, split: str, subset: str | None, limit: int | None) -> list[dict]:
    """A local .jsonl / .json / .parquet file, else a Hugging Face dataset."""
    return _read_local(source) if _looks_local(source) else _read_hf_dataset(source, split, subset, limit)


def read_builtin(split: str) -> list[dict]:
    """The bundled rows of `split`: "train" (the SFT conversations) or "eval" (held-out rows with
    task, prompt, answer and messages; disjoint from the SFT rows)."""
    if split not in BUILTIN_SFT_FILES:
        raise ValueError(f"the builtin data has splits {', '.join(BUILTIN_SFT_FILES)}; got {split!r}")
    return _read_jsonl(BUILTIN_SFT_FILES[split])


def load_sft_records(source: str, *, split: str = "train", limit: int | None = None,
                     subset: str | None = None) -> list[dict]:
    """Chat rows (each with `messages`) from `source`:
    "builtin" (split "train": the bundled SFT rows; "eval": the bundled eval rows), a local
    .jsonl / .json / .parquet file (split ignored), or a Hugging Face `datasets` name (with
    `subset` as its config). limit: keep the first `limit` rows."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0; got {limit}")
    if source in (None, "builtin"):
        rows = read_builtin(split)
        source = str(BUILTIN_SFT_FILES[split])
    else:
        rows = _read_file_or_hub(source, split, subset, limit)
    rows = rows if limit is None else rows[:limit]
    return [to_chat_record(row, f"{source} row {i}") for i, row in enumerate(rows)]


def read_rl_rows(source: str, *, split: str = "train", subset: str | None = None,
                 limit: int | None = None) -> list[dict]:
    """Rows of an RL prompt dataset: "builtin:<file>" (trainer/data/assets), a local file, or an HF dataset."""
    if source.startswith(BUILTIN_ASSET_PREFIX):
        rows = _read_local(str(ASSETS_DIR / source[len(BUILTIN_ASSET_PREFIX):]))
    else:
        rows = _read_file_or_hub(source, split, subset, limit)
    return rows if limit is None else rows[:limit]
