"""Data rows from where the user keeps them, and rows -> chat messages.

    source: "builtin" (trainer/data/assets) | "builtin:<file>" (any asset file, SFT and RL)
            | file.jsonl / .json / .parquet | HF datasets name
      ─ load_sft_records ─> [{"messages": [{"role", "content"}, ...], "tools"?: [...], ...}]
                             (to_chat_record: prompt/completion pairs become user + assistant turns)
      ─ read_rl_rows ─> raw rows; prompt_messages(row) ─> the prompt as messages ending in a user turn
                        (reference assistant and tool turns dropped, optional system turn before a text prompt)
    read_builtin(split)   the bundled rows: "train" (SFT conversations), "eval" (held-out prompts and answers)

Tool use (OpenAI / HF chat format; trainer/data/chat.py renders it):
    assistant  {"role": "assistant", "content": "" (or absent / null), "tool_calls": [{"type": "function",
                "function": {"name": "calculate", "arguments": {"expression": "3847 * 2919"}}, "id"?: "call_0"}]}
               (a flat {"name", "arguments"} call is accepted; arguments: an object, or a string holding one)
    tool       {"role": "tool", "content": "11229393", "name"?: "calculate", "tool_call_id"?: "call_0"}: right
               after the assistant turn that made the calls (or another tool message), answering one of them
    row        "tools": [{"type": "function", "function": {"name", "description", "parameters"}}] (a bare
               {"name", ...} function is wrapped; a JSON string holding the list is parsed)
    builtin:tool_use_sft.jsonl   the bundled calculator example (tool_use_sft_rows)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_SFT_FILES = {"train": ASSETS_DIR / "sft_tasks.jsonl", "eval": ASSETS_DIR / "eval_tasks.jsonl"}
BUILTIN_ASSET_PREFIX = "builtin:"  # data.source=builtin:<file> reads trainer/data/assets/<file> (SFT and RL)
TOOL_USE_SFT_FILE = ASSETS_DIR / "tool_use_sft.jsonl"
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


# ---------------------------------------------------------------- rows -> messages


def _as_messages(value, role: str) -> list[dict]:
    """A prompt/completion field (a string, or already a list of messages) -> messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return list(value)


_OPTIONAL_KEYS = ("tool_calls", "name", "tool_call_id")  # None means absent (parquet fills missing struct keys)


def _check_tool_call(call, where: str) -> dict:
    """One tool call -> {"type": "function", "function": {"name", "arguments": dict}} (+ its "id")."""
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be an object like {{'type': 'function', 'function': "
                         f"{{'name': ..., 'arguments': {{...}}}}}}; got {call!r}")
    if call.get("type", "function") != "function":
        raise ValueError(f"{where}: only tool calls of type 'function' are supported; got type {call['type']!r}")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"{where}: a tool call needs `function.name` (a non-empty string); got {call!r}")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: the arguments of tool call {function['name']!r} are a string that is not "
                             f"valid JSON ({err}); give a JSON object") from err
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: the arguments of tool call {function['name']!r} must be a JSON object "
                         f"(a dict, or a string holding one); got {arguments!r}")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise ValueError(f"{where}: a tool call `id` must be a string; got {call['id']!r}")
        out["id"] = call["id"]
    return out


def _check_tool_result(message: dict, calls: list[dict] | None, at: str) -> None:
    """A `tool` message: right after the assistant turn whose calls it answers, naming one of them."""
    if calls is None:
        raise ValueError(f"{at}: a `tool` message must follow an assistant message with `tool_calls` "
                         "(or another tool message answering the same turn)")
    for key in ("name", "tool_call_id"):
        if key in message and not isinstance(message[key], str):
            raise ValueError(f"{at}: a tool message's `{key}` must be a string; got {message[key]!r}")
    names = [c["function"]["name"] for c in calls]
    if "name" in message and message["name"] not in names:
        raise ValueError(f"{at}: this tool result is from {message['name']!r}, but the assistant turn before it "
                         f"called {names}")
    ids = [c["id"] for c in calls if "id" in c]
    if "tool_call_id" in message and ids and message["tool_call_id"] not in ids:
        raise ValueError(f"{at}: tool_call_id {message['tool_call_id']!r} answers no call of the assistant turn "
                         f"before it (its call ids: {ids})")


def _check_messages(messages, where: str, tool_names: set[str] | None = None) -> list[dict]:
    """Checked copies of the messages (tool calls normalized: see the module docstring). tool_names: the
    row's `tools`, which every call must name (None: the row has no `tools`)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: `messages` must be a non-empty list of {{'role', 'content'}} dicts")
    checked, open_calls = [], None  # open_calls: the calls that `tool` messages may answer now
    for i, message in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"{at} needs a string `role` and a string `content`; got {message!r}")
        m = {k: v for k, v in message.items() if not (k in _OPTIONAL_KEYS and v is None)}
        role = m["role"]
        if "tool_calls" in m:
            calls = m.pop("tool_calls")
            if role != "assistant":
                raise ValueError(f"{at}: only assistant messages may have `tool_calls` (this one is {role!r})")
            if not isinstance(calls, (list, tuple)):
                raise ValueError(f"{at}: `tool_calls` must be a list of calls; got {calls!r}")
            if calls:
                m["tool_calls"] = [_check_tool_call(c, f"{at} tool call {j}") for j, c in enumerate(calls)]
                if m.get("content") is None:
                    m["content"] = ""
        if not isinstance(m.get("content"), str):
            if role == "tool":
                raise ValueError(f"{at}: a `tool` message needs a string `content` (the tool's result: json.dumps "
                                 f"a structured one); got {message!r}")
            raise ValueError(f"{at} needs a string `role` and a string `content` (an assistant message may have "
                             f"`tool_calls` instead); got {message!r}")
        for call in m.get("tool_calls", ()):
            name = call["function"]["name"]
            if tool_names is not None and name not in tool_names:
                raise ValueError(f"{at}: calls tool {name!r}, which is not in the row's `tools` "
                                 f"({sorted(tool_names)})")
        if role == "tool":
            _check_tool_result(m, open_calls, at)
        elif role == "assistant" and "tool_calls" in m:
            open_calls = m["tool_calls"]
        else:
            open_calls = None
        checked.append(m)
    return checked


def _check_tools(tools, where: str) -> list[dict] | None:
    """A row's `tools` -> a list of {"type": "function", "function": {"name", ...}} (None: the row has none)."""
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: `tools` is a string that is not valid JSON ({err}); give a list of "
                             "function schemas") from err
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"{where}: `tools` must be a list of function schemas like {{'type': 'function', "
                         f"'function': {{'name': ..., 'description': ..., 'parameters': {{...}}}}}}; got {tools!r}")
    out = []
    for j, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"] \
                or tool.get("type", "function") != "function":
            raise ValueError(f"{where}: tools[{j}] must be {{'type': 'function', 'function': {{'name': ..., "
                             f"'description': ..., 'parameters': {{...}}}}}} (a function schema); got {tool!r}")
        out.append(dict(tool) if "function" in tool else {"type": "function", "function": dict(tool)})
    return out


def to_chat_record(row: dict, where: str = "row") -> dict:
    """A data row -> the row with `messages`: rows that have `messages` are checked; `prompt` +
    `completion` rows (strings or message lists) become user + assistant messages. A row's `tools`
    (function schemas for apply_chat_template(tools=...)) are checked and kept."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "completion" in row:
        messages = _as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant")
    else:
        raise ValueError(f"{where}: a row needs `messages` or `prompt` + `completion`; it has {sorted(row)}")
    tools = _check_tools(row.get("tools"), where)
    names = None if tools is None else {t["function"]["name"] for t in tools}
    record = {**row, "messages": _check_messages(messages, where, names)}
    if "tools" in row:
        record["tools"] = tools
    return record


def prompt_messages(row: dict, where: str, system_prompt: str | None) -> list[dict]:
    """A row's prompt as chat messages ending in a user turn (reference assistant turns, and the tool results
    between them, dropped)."""
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
    while messages and messages[-1]["role"] in ("assistant", "tool"):  # a reference answer, tool use included
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


def _read_builtin_asset(source: str) -> list[dict]:
    """data.source=builtin:<file>: the rows of trainer/data/assets/<file>."""
    name = source[len(BUILTIN_ASSET_PREFIX):]
    path = ASSETS_DIR / name
    if not name or not path.is_file():
        files = sorted(p.name for p in ASSETS_DIR.iterdir() if p.suffix in _LOCAL_SUFFIXES)
        raise FileNotFoundError(f"data.source={source!r}: no bundled file {name!r} in {ASSETS_DIR}; "
                                f"the bundled files: {', '.join(f'builtin:{f}' for f in files)}")
    return _read_local(str(path))


def load_sft_records(source: str, *, split: str = "train", limit: int | None = None,
                     subset: str | None = None) -> list[dict]:
    """Chat rows (each with `messages`, and `tools` where the row has them) from `source`:
    "builtin" (split "train": the bundled SFT rows; "eval": the bundled eval rows), "builtin:<file>"
    (trainer/data/assets/<file>, e.g. builtin:tool_use_sft.jsonl; split ignored), a local
    .jsonl / .json / .parquet file (split ignored), or a Hugging Face `datasets` name (with
    `subset` as its config). limit: keep the first `limit` rows."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0; got {limit}")
    if source in (None, "builtin"):
        rows = read_builtin(split)
        source = str(BUILTIN_SFT_FILES[split])
    elif source.startswith(BUILTIN_ASSET_PREFIX):
        rows = _read_builtin_asset(source)
    else:
        rows = _read_file_or_hub(source, split, subset, limit)
    rows = rows if limit is None else rows[:limit]
    return [to_chat_record(row, f"{source} row {i}") for i, row in enumerate(rows)]


def read_rl_rows(source: str, *, split: str = "train", subset: str | None = None,
                 limit: int | None = None) -> list[dict]:
    """Rows of an RL prompt dataset: "builtin:<file>" (trainer/data/assets), a local file, or an HF dataset."""
    if source.startswith(BUILTIN_ASSET_PREFIX):
        rows = _read_builtin_asset(source)
    else:
        rows = _read_file_or_hub(source, split, subset, limit)
    return rows if limit is None else rows[:limit]


# ---------------------------------------------------------------- the bundled tool-use example


TOOL_USE_SYSTEM_PROMPT = ("Solve the task. Use the calculate tool for arithmetic. "
                          "Give the final answer as <answer>...</answer>.")
CALCULATE_TOOL = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def _call(expression: str, call_id: str | None = None) -> dict:
    call = {"type": "function", "function": {"name": "calculate", "arguments": {"expression": expression}}}
    return call if call_id is None else {**call, "id": call_id}


def _result(value: int, call_id: str | None = None) -> dict:
    message = {"role": "tool", "name": "calculate", "content": str(value)}
    return message if call_id is None else {**message, "tool_call_id": call_id}


def tool_use_sft_rows(n: int = 40, seed: int = 4242) -> list[dict]:
    """The rows of builtin:tool_use_sft.jsonl (deterministic): calculator tool use in five shapes, in turn:
    one call; text then a call (with call ids); two calls in sequence; two calls in parallel; no call (small
    sums are answered directly). Regenerate: records._write_jsonl(tool_use_sft_rows(), TOOL_USE_SFT_FILE)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            a, b = rng.randint(100, 9999), rng.randint(100, 9999)
            question, turns = f"What is {a} * {b}?", [
                {"role": "assistant", "content": "", "tool_calls": [_call(f"{a} * {b}")]}, _result(a * b)]
            answer = a * b
        elif kind == 1:
            a, b, c = rng.randint(10, 999), rng.randint(10, 999), rng.randint(2, 99)
            expression, cid = f"({a} + {b}) * {c}", f"call_{i}"
            question, turns = f"What is {expression}?", [
                {"role": "assistant", "content": f"I will compute {expression}.",
                 "tool_calls": [_call(expression, cid)]}, _result((a + b) * c, cid)]
            answer = (a + b) * c
        elif kind == 2:
            boxes, per_box, loose = rng.randint(12, 99), rng.randint(12, 99), rng.randint(1, 99)
            question = (f"A shop has {boxes} boxes of {per_box} pens and {loose} loose pens. "
                        "How many pens does it have?")
            answer = boxes * per_box + loose
            turns = [{"role": "assistant", "content": "", "tool_calls": [_call(f"{boxes} * {per_box}")]},
                     _result(boxes * per_box),
                     {"role": "assistant", "content": "", "tool_calls": [_call(f"{boxes * per_box} + {loose}")]},
                     _result(answer)]
        elif kind == 3:
            a, b, c, d = (rng.randint(100, 999) for _ in range(4))
            first, second = f"call_{i}_0", f"call_{i}_1"
            question = f"Which is larger, {a} * {b} or {c} * {d}? Give the larger product."
            turns = [{"role": "assistant", "content": "",
                      "tool_calls": [_call(f"{a} * {b}", first), _call(f"{c} * {d}", second)]},
                     _result(a * b, first), _result(c * d, second)]
            answer = max(a * b, c * d)
        else:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            question, turns, answer = f"What is {a} + {b}?", [], a + b
        final = {"role": "assistant", "content": (f"{question[8:-1]} = {answer}\n" if kind == 4 else "")
                 + f"<answer>{answer}</answer>"}
        rows.append({"messages": [{"role": "system", "content": TOOL_USE_SYSTEM_PROMPT},
                                  {"role": "user", "content": question}, *turns, final],
                     "tools": [CALCULATE_TOOL], "answer": str(answer)})
    return rows


def _write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
