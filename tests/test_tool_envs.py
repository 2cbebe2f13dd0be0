"""Tool-using environments: schemas, tool-call parsing and running (every failure is a tool message, never an
exception), the calculator's safe evaluator and scripted episodes, the long-document episode's length and reward."""

from __future__ import annotations

import json
import threading

import pytest

from trainer.data.chat import template_ids
from trainer.data.tokenizer import load_tokenizer
from trainer.rl.envs.calculator import CalculatorEnv, calculate
from trainer.rl.envs.long_doc import LongDocEnv, fact_sentence
from trainer.rl.envs.tools import (
    CALL_FORMAT,
    ToolCall,
    ToolCallError,
    ToolEnv,
    parse_tool_calls,
    template_renders_tools,
)

QWEN_STYLE_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\s*<\|im_end\|>", "content": "text"},
    },
}


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def shout(text: str) -> str:
    """Upper-case a text.

    Args:
        text: What to upper-case.
    """
    return text.upper()


def explode(reason: str) -> str:
    """Always fail.

    Args:
        reason: Why.
    """
    raise RuntimeError(f"exploded: {reason}")


RELEASE_SLOW_TOOL = threading.Event()


def wait_forever(seconds: float) -> str:
    """Block until the test releases it.

    Args:
        seconds: Ignored.
    """
    RELEASE_SLOW_TOOL.wait(10)
    return "late"


def call(name: str, arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def step(env: ToolEnv, text: str) -> tuple[list[dict], bool]:
    return env.step([{"role": "user", "content": "go"}, assistant(text)], {"prompt": "go", "answer": ""})


# ---------------------------------------------------------------- schemas and prompt


def test_schema_from_type_hints_and_docstring(tokenizer):
    env = ToolEnv([add, shout])
    assert env.tools[0] == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "required": ["a", "b"], "properties": {
            "a": {"type": "integer", "description": "The first number."},
            "b": {"type": "integer", "description": "The second number."}}},
        "return": {"type": "integer"}}}
    prompt = env.tool_system_prompt()
    assert json.dumps(env.tools[1]["function"]) in prompt and "<tool_call>" in prompt
    assert not template_renders_tools(tokenizer)  # the builtin template ignores tools=: they go in the system message
    assert not env.system_in_prompt  # cptrain's renderer shows env.tools (trainer/data/chat.py prepare_chat)
    assert prompt in ToolEnv([add, shout], tokenizer=tokenizer, system_in_prompt=None).system_prompt()

    renders_tools = load_tokenizer("builtin")
    renders_tools.chat_template = ("{% if tools %}{{ tools | tojson }}{% endif %}"
                                   "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template_renders_tools(renders_tools)
    assert ToolEnv([add], tokenizer=renders_tools).system_prompt() == ToolEnv.instructions


# ---------------------------------------------------------------- parsing and running


def test_one_call_several_calls_and_arguments_as_a_json_string():
    env = ToolEnv([add, shout])
    replies, done = step(env, "Let me add. " + call("add", {"a": 2, "b": 3}))
    assert (replies, done) == ([{"role": "tool", "name": "add", "content": "5"}], False)

    text = call("add", {"a": 40, "b": 2}) + "\n" + call("shout", json.dumps({"text": "hi"}))
    replies, done = step(env, text)
    assert [m["content"] for m in replies] == ["42", "HI"] and [m["name"] for m in replies] == ["add", "shout"]
    assert env.metrics() == {"tool_calls": 3.0, "tool_call_successes": 3.0}

    assert step(env, "The sum is <answer>5</answer>") == ([], True)  # no call: the model answered


@pytest.mark.parametrize("text, error", [
    ('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>', "not valid JSON"),
    ('<tool_call>{"name": "add", "arguments": "{a: 1}"}</tool_call>', "not valid JSON"),
    ('<tool_call>{"arguments": {"a": 1}}</tool_call>', 'no "name"'),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', "no closing </tool_call>"),
    (call("multiply", {"a": 1, "b": 2}), "unknown tool 'multiply'; the tools are: add, explode, wait_forever"),
    (call("add", {"a": 1}), "add is missing the required argument(s) b (its arguments: a, b)"),
    (call("add", {"a": 1, "b": 2, "c": 3}), "add got unexpected argument(s) c"),
    (call("add", {"a": 1, "b": "2"}), "argument 'b' must be an integer, got \"2\""),
    (call("explode", {"reason": "test"}), "explode raised RuntimeError: exploded: test"),
    (call("wait_forever", {"seconds": 1.0}), "wait_forever did not finish within 0.2 s"),
])
def test_a_bad_call_is_an_error_message_not_an_exception(text, error):
    env = ToolEnv([add, explode, wait_forever], timeout_s=0.2)
    RELEASE_SLOW_TOOL.clear()
    try:
        replies, done = step(env, text)
    finally:
        RELEASE_SLOW_TOOL.set()
    assert not done and len(replies) == 1 and replies[0]["role"] == "tool"
    assert replies[0]["content"].startswith("Error: ") and error in replies[0]["content"], replies[0]["content"]
    assert env.metrics() == {"tool_calls": 1.0, "tool_call_successes": 0.0}


def test_a_good_call_still_runs_next_to_a_bad_one():
    env = ToolEnv([add])
    replies, done = step(env, call("add", {"a": 1}) + call("add", {"a": 1, "b": 1}))
    assert replies[0]["content"].startswith("Error:") and replies[1]["content"] == "2" and not done
    assert env.metrics() == {"tool_calls": 2.0, "tool_call_successes": 1.0}


def test_the_tokenizers_response_template_parses_calls_when_it_has_one():
    tokenizer = load_tokenizer("builtin")
    tokenizer.response_template = QWEN_STYLE_RESPONSE_TEMPLATE
    schemas = ToolEnv([add]).tools
    text = 'Adding. <tool_call>{"name": "add", "arguments": {"a": "2", "b": 3}}</tool_call>'
    assert parse_tool_calls(text) == [ToolCall("add", {"a": "2", "b": 3})]  # the tag convention, as written
    assert parse_tool_calls(text, tokenizer, schemas) == [ToolCall("add", {"a": 2, "b": 3})]  # cast by the schema
    assert parse_tool_calls("<answer>5</answer>", tokenizer, schemas) == []
    bad = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": }}</tool_call>', tokenizer, schemas)
    assert len(bad) == 1 and isinstance(bad[0], ToolCallError) and "not valid JSON" in bad[0].error
    env = ToolEnv([add], tokenizer=tokenizer)
    assert step(env, text) == ([{"role": "tool", "name": "add", "content": "5"}], False)


# ---------------------------------------------------------------- calculator


def test_calculate_evaluates_arithmetic_exactly():
    assert calculate("437 * 2891") == str(437 * 2891)
    assert calculate(" (12 + 30) * 7 / 2 ") == "147"
    assert calculate("7 / 2") == "3.5" and calculate("-(3 - 10)") == "7"


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "open('/etc/passwd')", "x + 1", "(1).__class__", "2 ** 100", "7 // 2",
    "1.5 * 2", "True + 1", "[1, 2]", "1; 2", "1 / 0", "1 + " * 60 + "1", "",
])
def test_calculate_refuses_everything_but_arithmetic(expression):
    with pytest.raises(ValueError):
        calculate(expression)


def test_calculate_refusal_reaches_the_model_as_an_error():
    env = CalculatorEnv()
    replies, done = step(env, call("calculate", {"expression": "__import__('os').getcwd()"}))
    assert not done and replies[0]["content"].startswith("Error: calculate raised ValueError: only integers")


def test_calculator_rows_are_deterministic_and_hard():
    rows = CalculatorEnv.make_rows(30, seed=7)
    assert rows == CalculatorEnv.make_rows(30, seed=7) and rows != CalculatorEnv.make_rows(30, seed=8)
    for row in rows:
        assert row["task"] == "calculator" and int(row["answer"]) >= 1000
        assert calculate(row["prompt"].removeprefix("What is ").removesuffix("?")) == row["answer"]


def test_scripted_calculator_episode(tokenizer):
    env = CalculatorEnv(tokenizer=tokenizer)
    row = CalculatorEnv.make_rows(1, seed=3)[0]
    messages = env.reset(row)
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1]["content"] == row["prompt"]
    assert "calculate" in messages[0]["content"] and "<answer>" in messages[0]["content"]  # builtin: tools in system

    expression = row["prompt"].removeprefix("What is ").removesuffix("?")
    messages.append(assistant(call("calculate", {"expression": expression})))
    replies, done = env.step(messages, row)
    assert replies == [{"role": "tool", "name": "calculate", "content": row["answer"]}] and not done
    messages += replies
    right = messages + [assistant(f"<answer>{row['answer']}</answer>")]
    assert env.step(right, row) == ([], True)
    assert env.reward(right, row) == {"correct": 1.0, "used_tool": 1.0}
    wrong = messages + [assistant(f"<answer>{int(row['answer']) + 1}</answer>")]
    assert env.reward(wrong, row) == {"correct": 0.0, "used_tool": 1.0}
    guessed = env.reset(row) + [assistant(f"<answer>{row['answer']}</answer>")]
    assert env.reward(guessed, row) == {"correct": 1.0, "used_tool": 0.0}
    assert env.metrics() == {"tool_calls": 1.0, "tool_call_successes": 1.0}
    assert len(template_ids(tokenizer, right)) > 0  # the whole episode renders through the chat template


# ---------------------------------------------------------------- long document


def test_long_doc_rows_and_documents_are_reproducible():
    rows = LongDocEnv.make_rows(20, seed=1)
    assert rows == LongDocEnv.make_rows(20, seed=1) and {row["task"] for row in rows} == {"long_doc"}
    row = rows[0]
    first, second = LongDocEnv(sections=6, section_words=80), LongDocEnv(sections=6, section_words=80)
    assert first.reset(row) == second.reset(row) and first.document == second.document
    fact = fact_sentence(row["key"], row["answer"])
    assert sum(fact in text for text in first.document) == 1
    assert fact in first.document[min(int(row["fact_depth"] * 6), 5)]
    assert sum("The code word for the" in text for text in first.document) == 4  # the fact and 3 distractors


def test_scripted_long_doc_episode_is_long_and_rewards_the_fact(tokenizer):
    env = LongDocEnv(sections=8, section_words=250, search=True, system_in_prompt=True)
    row = LongDocEnv.make_rows(1, seed=5)[0]
    messages = env.reset(row)
    assert "read_section" in messages[0]["content"] and "8 sections" in messages[1]["content"]

    replies, _ = env.step(messages + [assistant(call("search", {"term": f"the {row['key']}"}))], row)
    fact_section = min(int(row["fact_depth"] * 8), 7)
    assert replies[0]["content"] == f"'the {row['key']}' appears in sections {fact_section}"

    messages.append(assistant("".join(call("read_section", {"index": i}) for i in range(8))))
    replies, done = env.step(messages, row)
    assert not done and [m["name"] for m in replies] == ["read_section"] * 8
    assert fact_sentence(row["key"], row["answer"]) in replies[fact_section]["content"]
    messages += replies
    beyond, _ = env.step(messages + [assistant(call("read_section", {"index": 8}))], row)
    assert beyond[0]["content"] == "Error: read_section raised ValueError: there is no section 8; " \
                                   "the sections are numbered 0 to 7"

    answered = messages + [assistant(f"<answer>{row['answer'].upper()}</answer>")]
    assert env.step(answered, row) == ([], True)
    assert len(template_ids(tokenizer, answered)) >= 4096
    assert env.reward(answered, row) == 1.0
    assert env.reward(messages + [assistant("<answer>amber-nothing</answer>")], row) == 0.0
    assert env.metrics() == {"tool_calls": 10.0, "tool_call_successes": 9.0}
