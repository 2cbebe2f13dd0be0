"""Tool-using RL environments: the model calls Python functions, the environment answers with their results.

    ToolEnv(tools=[fn, ...], timeout_s, tokenizer, system_in_prompt)
      tools            JSON schemas from each fn's type hints + Google docstring (transformers get_json_schema)
      reset(row)   ─> [system: instructions (+ tool_system_prompt() when the chat template ignores tools=),
                       user: row["prompt"]]
      step(messages, row)   the last assistant turn's text
        ─ parse_tool_calls(text, tokenizer) ─> [ToolCall(name, arguments) | ToolCallError(error)]
            the tokenizer's response_template (tokenizer.parse_response), when it has one and it parses;
            else <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (Qwen / Hermes convention)
        ─ no call ─> ([], True): the model answered, the episode is over
        ─ each call, in order: known tool? arguments bind to its signature and match its schema types?
            run it in a daemon thread, at most timeout_s ─> {"role": "tool", "name": fn, "content": str(result)}
            anything wrong (bad JSON, unknown tool, bad arguments, an exception, a timeout) is a tool
            message whose content starts with "Error:" and says what to fix; never an exception
        ─> (tool messages, False)
      reward(messages, row)   the last assistant turn's <answer>..</answer> == row["answer"] (subclasses refine)
      metrics()   {"tool_calls": calls seen, "tool_call_successes": calls that ran and returned}

Subclasses (calculator.py, long_doc.py) add their tools, task rows (make_rows) and rewards.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers.utils import get_json_schema

from trainer.data.chat import tools_system_text
from trainer.rl.tasks import SYSTEM_PROMPT, extract_answer

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
CALL_FORMAT = TOOL_CALL_OPEN + '{"name": "<tool name>", "arguments": {<argument name>: <value>, ...}}' + TOOL_CALL_CLOSE
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call the model wrote: a tool name and its arguments (checked against the tool on run)."""

    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolCallError:
    """A call the model wrote that could not be read; `error` tells the model what was wrong."""

    error: str
    name: str | None = None


# ---------------------------------------------------------------- schemas and the prompt


def tool_schemas(tools: list[Callable]) -> list[dict]:
    """OpenAI-format function schemas ({"type": "function", "function": {name, description, parameters}}) from
    each function's type hints and Google-style docstring (every argument needs a hint and an `Args:` line)."""
    return [get_json_schema(fn) for fn in tools]


def template_renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders the `tools=` it is given (decided by rendering a probe with and
    without a tool); when it does not (e.g. the builtin tokenizer), the tool list goes into the system message."""
    probe = [{"role": "user", "content": "probe"}]
    schema = [{"type": "function", "function": {"name": "probe_tool", "description": "A probe.",
                                                "parameters": {"type": "object", "properties": {}}}}]
    try:
        return (tokenizer.apply_chat_template(probe, tools=schema, tokenize=False)
                != tokenizer.apply_chat_template(probe, tokenize=False))
    except Exception:  # a template that rejects tools=
        return False


def tool_system_prompt(schemas: list[dict]) -> str:
    """System-message text listing the tools and the call convention: the block SFT writes for templates that
    ignore tools= (trainer/data/chat.py tools_system_text), so SFT and RL show the model the same text."""
    return tools_system_text(schemas) + "\nWhen you know the final answer, reply without a tool call."


# ---------------------------------------------------------------- parsing


def _call_from_json(body: Any, name_hint: str | None = None) -> ToolCall | ToolCallError:
    """{"name": str, "arguments": {...} or a JSON string of one} -> ToolCall; anything else -> ToolCallError."""
    if not isinstance(body, dict):
        return ToolCallError(f"a tool call must be a JSON object like {CALL_FORMAT}", name_hint)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError(f'the tool call has no "name"; write {CALL_FORMAT}', name_hint)
    arguments = body.get("arguments", body.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            return ToolCallError(f'the "arguments" of {name} are a string that is not valid JSON ({err})', name)
    if not isinstance(arguments, dict):
        return ToolCallError(f'the "arguments" of {name} must be a JSON object of argument names to values', name)
    return ToolCall(name, arguments)


def parse_tagged_tool_calls(text: str) -> list[ToolCall | ToolCallError]:
    """The <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks in `text`, in order."""
    calls: list[ToolCall | ToolCallError] = []
    for match in _TOOL_CALL_RE.finditer(text):
        try:
            body = json.loads(match.group(1).strip())
        except json.JSONDecodeError as err:
            calls.append(ToolCallError(f"the tool call is not valid JSON ({err}); write {CALL_FORMAT}"))
            continue
        calls.append(_call_from_json(body))
    if TOOL_CALL_OPEN in _TOOL_CALL_RE.sub("", text):
        calls.append(ToolCallError(f"a {TOOL_CALL_OPEN} has no closing {TOOL_CALL_CLOSE}; write {CALL_FORMAT}"))
    return calls


def parse_tool_calls(text: str, tokenizer=None, tools: list[dict] | None = None) -> list[ToolCall | ToolCallError]:
    """The tool calls in one assistant turn. With a tokenizer that has a `response_template` (transformers 5's
    declarative response parser), its `parse_response` reads the model's native format (arguments cast to the
    `tools` schemas' types); where it cannot parse the turn, the <tool_call> JSON convention is read instead,
    and if that finds nothing either, the parser's complaint becomes one ToolCallError."""
    if tokenizer is None or getattr(tokenizer, "response_template", None) is None:
        return parse_tagged_tool_calls(text)
    try:
        parsed = tokenizer.parse_response(text, prefix="", tools=tools)
    except ValueError as err:
        tagged = parse_tagged_tool_calls(text)
        return tagged or [ToolCallError(f"the tool calls could not be parsed ({str(err).splitlines()[0]})")]
    calls: list[ToolCall | ToolCallError] = []
    for entry in parsed.get("tool_calls") or []:
        function = entry.get("function", entry) if isinstance(entry, dict) else entry
        calls.append(_call_from_json(function))
    return calls


# ---------------------------------------------------------------- running


class _ToolTimeout(Exception):
    pass


def _run_with_timeout(fn: Callable, arguments: dict, timeout_s: float) -> Any:
    """fn(**arguments) in a daemon thread, waiting at most timeout_s. A thread cannot be killed, so an overrunning
    tool keeps running in the background; daemon threads (unlike a ThreadPoolExecutor's workers, which are joined
    at interpreter exit) never keep the process alive."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(**arguments)
        except BaseException as err:  # noqa: BLE001 - reported to the model, whatever it is
            outcome["error"] = err

    thread = threading.Thread(target=target, name=f"tool-{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise _ToolTimeout
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _type_error(name: str, value: Any, spec: dict) -> str | None:
    """Why `value` does not match the JSON-schema type of argument `name`, or None when it does."""
    declared = spec.get("type")
    types = [declared] if isinstance(declared, str) else list(declared or [])
    if spec.get("nullable"):
        types.append("null")
    if not types or any(t not in _JSON_TYPES for t in types):
        return None
    for t in types:
        if isinstance(value, _JSON_TYPES[t]) and not (isinstance(value, bool) and t in ("integer", "number")):
            return None
    wanted = " or ".join(("an " if t[0] in "aeiou" else "a ") + t for t in types)
    return f"argument {name!r} must be {wanted}, got {json.dumps(value)}"


def _result_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


class ToolEnv:
    """An environment whose model may call `tools` (plain typed, documented functions) before answering.

    tokenizer: optional; its response_template (if any) parses calls. The tool list reaches the model through
    `tools`: cptrain's episode renderer passes it to the chat template, or, where the template ignores tools=,
    writes the same "# Tools" block SFT writes into the system message (trainer/data/chat.py prepare_chat).
    system_in_prompt=True writes tool_system_prompt() into reset's system message itself (for use outside
    cptrain's renderer; None: when the tokenizer's template ignores tools=). Subclasses set `instructions` and
    usually override reset, reward and make_rows."""

    instructions = SYSTEM_PROMPT

    def __init__(self, tools: list[Callable], timeout_s: float = 5.0, tokenizer=None,
                 system_in_prompt: bool | None = False):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.functions = {fn.__name__: fn for fn in tools}
        if len(self.functions) != len(tools):
            raise ValueError(f"tool names must be unique, got {[fn.__name__ for fn in tools]}")
        self.tools = tool_schemas(tools)
        self.parameters = {schema["function"]["name"]: schema["function"]["parameters"] for schema in self.tools}
        self.timeout_s = timeout_s
        self.tokenizer = tokenizer
        if system_in_prompt is None:
            system_in_prompt = tokenizer is not None and not template_renders_tools(tokenizer)
        self.system_in_prompt = system_in_prompt
        self.tool_calls = 0
        self.tool_call_successes = 0

    def tool_system_prompt(self) -> str:
        return tool_system_prompt(self.tools)

    def system_prompt(self) -> str:
        """The instructions, followed by the tool list when the chat template will not render it."""
        return self.instructions + ("\n\n" + self.tool_system_prompt() if self.system_in_prompt else "")

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt()}, {"role": "user", "content": row["prompt"]}]

    def parse_tool_calls(self, text: str) -> list[ToolCall | ToolCallError]:
        return parse_tool_calls(text, self.tokenizer, self.tools)

    def step(self, messages: list[dict], row: dict) -> tuple[list[dict], bool]:
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("step needs the conversation to end with the model's assistant turn")
        calls = self.parse_tool_calls(messages[-1].get("content") or "")
        if not calls:
            return [], True
        return [self.run_call(call) for call in calls], False

    def run_call(self, call: ToolCall | ToolCallError) -> dict:
        """One call -> its tool message; counts it, and counts it successful when the tool ran and returned."""
        self.tool_calls += 1
        name = call.name or "tool_call"
        if isinstance(call, ToolCallError):
            return self._error(name, call.error)
        fn = self.functions.get(call.name)
        if fn is None:
            return self._error(name, f"unknown tool {call.name!r}; the tools are: {', '.join(self.functions)}")
        problem = self._argument_problem(call)
        if problem:
            return self._error(name, problem)
        try:
            value = _run_with_timeout(fn, call.arguments, self.timeout_s)
        except _ToolTimeout:
            return self._error(name, f"{name} did not finish within {self.timeout_s:g} s")
        except Exception as err:  # noqa: BLE001 - the model learns from the message, the episode goes on
            return self._error(name, f"{name} raised {type(err).__name__}: {err}")
        self.tool_call_successes += 1
        return {"role": "tool", "name": name, "content": _result_text(value)}

    def _argument_problem(self, call: ToolCall) -> str | None:
        """What is wrong with the call's arguments (missing, unexpected, wrong JSON type), or None."""
        parameters = self.parameters[call.name]
        properties = parameters.get("properties", {})
        expected = ", ".join(properties) or "none"
        try:
            inspect.signature(self.functions[call.name]).bind(**call.arguments)
        except TypeError:
            missing = [p for p in parameters.get("required", []) if p not in call.arguments]
            unexpected = [a for a in call.arguments if a not in properties]
            if missing:
                problem = f"is missing the required argument(s) {', '.join(missing)}"
            elif unexpected:
                problem = f"got unexpected argument(s) {', '.join(unexpected)}"
            else:
                problem = f"cannot take the arguments {json.dumps(call.arguments)}"
            return f"{call.name} {problem} (its arguments: {expected})"
        for key, value in call.arguments.items():
            problem = _type_error(key, value, properties.get(key, {}))
            if problem:
                return f"{call.name}: {problem}"
        return None

    @staticmethod
    def _error(name: str, text: str) -> dict:
        return {"role": "tool", "name": name, "content": f"Error: {text}"}

    def reward(self, messages: list[dict], row: dict) -> float | dict[str, float]:
        """1.0 when the last assistant turn's <answer>..</answer> equals row["answer"], else 0.0."""
        return float(final_answer(messages) == str(row["answer"]).strip())

    def metrics(self) -> dict[str, float]:
        return {"tool_calls": float(self.tool_calls), "tool_call_successes": float(self.tool_call_successes)}


def final_answer(messages: list[dict]) -> str | None:
    """The <answer>..</answer> of the last assistant message (None when there is none or it has no tag)."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return extract_answer(message.get("content") or "")
    return None
