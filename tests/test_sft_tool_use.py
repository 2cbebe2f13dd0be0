"""SFT on tool-use conversations (trainer/data/records.py, chat.py): rows with assistant `tool_calls`, `tool`
results and a row-level `tools` list are checked, rendered with tools=... everywhere, and trained on exactly the
assistant turns (text, tool calls as rendered, end-of-turn token), never on tool results; templates that ignore
tool_calls / tools get the Hermes / Qwen text convention instead of silently dropping them; the bundled
builtin:tool_use_sft.jsonl example; plain rows tokenize exactly as before."""

import hashlib
import json
import re
from types import SimpleNamespace

import pytest

from trainer.data.chat import (TOOL_CALL_CLOSE, TOOL_CALL_OPEN, format_tool_call, prepare_chat, template_ids,
                               tokenize_chat, tokenize_sft_records, tools_system_text)
from trainer.data.records import (TOOL_USE_SFT_FILE, load_sft_records, prompt_messages, read_rl_rows,
                                  to_chat_record, tool_use_sft_rows)
from trainer.data.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "calculate", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
CALL = {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "3847 * 2919"}}}
ROW = {"messages": [{"role": "system", "content": "Use the tool."},
                    {"role": "user", "content": "What is 3847 * 2919?"},
                    {"role": "assistant", "content": "", "tool_calls": [CALL]},
                    {"role": "tool", "name": "calculate", "content": "11229393"},
                    {"role": "assistant", "content": "<answer>11229393</answer>"}],
       "tools": TOOLS}
CALL_TEXT = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "3847 * 2919"}}\n</tool_call>'

# A ChatML template with native tool support (Qwen-like: a tools block in the system turn, tool calls after the
# assistant text, tool results as <tool_response> in a user turn), assistant turns inside {% generation %}.
NATIVE_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{%- generation %}{{- message.content }}"
    "{%- for call in message.tool_calls or [] %}{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": '"
    " + (call.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _without_generation(template: str) -> str:
    plain = template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert "{%- generation" not in plain and "endgeneration" not in plain
    return plain


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


@pytest.fixture(scope="module")
def builtin_plain():
    """The builtin template without {% generation %}: the rendered-prefix mask path."""
    t = load_tokenizer("builtin")
    t.chat_template = _without_generation(t.chat_template)
    return t


@pytest.fixture(scope="module")
def native():
    t = load_tokenizer("builtin")
    t.chat_template = NATIVE_TOOLS_TEMPLATE
    return t


@pytest.fixture(scope="module")
def native_plain():
    t = load_tokenizer("builtin")
    t.chat_template = _without_generation(NATIVE_TOOLS_TEMPLATE)
    return t


def spans(tok, ids, mask, value=True) -> list[str]:
    """The decoded runs of tokens whose mask is `value`."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [not value]):
        if m == value and start is None:
            start = i
        if m != value and start is not None:
            out.append(tok.decode(ids[start:i]))
            start = None
    return out


# ---------------------------------------------------------------- the loss mask


def test_builtin_template_gets_the_calls_and_tools_written_in_and_trains_only_the_assistant_turns(
        tok, builtin_plain):
    record = to_chat_record(ROW)
    ids, mask = tokenize_chat(tok, record["messages"], tools=record["tools"])
    system = "Use the tool.\n\n" + tools_system_text(TOOLS)
    assert tok.decode(ids) == (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is 3847 * 2919?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL_TEXT}<|im_end|>\n<|im_start|>tool\n11229393<|im_end|>\n"
        "<|im_start|>assistant\n<answer>11229393</answer><|im_end|>\n")
    assert spans(tok, ids, mask) == [CALL_TEXT + "<|im_end|>", "<answer>11229393</answer><|im_end|>"]
    assert spans(tok, ids, mask, False) == [
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is 3847 * 2919?<|im_end|>\n"
        "<|im_start|>assistant\n", "\n<|im_start|>tool\n11229393<|im_end|>\n<|im_start|>assistant\n", "\n"]
    assert '"name": "calculate"' in tools_system_text(TOOLS) and "<tools>" in system
    # the prefix path (no {% generation %}) finds the same tokens
    assert tokenize_chat(builtin_plain, record["messages"], tools=record["tools"]) == (ids, mask)
    # the written-in calls parse back (Hermes / Qwen: what the RL side parses)
    trained = "".join(spans(tok, ids, mask))
    calls = [json.loads(m) for m in re.findall(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*"
                                               + re.escape(TOOL_CALL_CLOSE), trained, re.S)]
    assert calls == [{"name": "calculate", "arguments": {"expression": "3847 * 2919"}}]


def test_text_before_calls_and_parallel_calls_follow_the_qwen_layout():
    message = {"role": "assistant", "content": "Let me check.",
               "tool_calls": [CALL, {"name": "calculate", "arguments": '{"expression": "1 + 1"}'}]}
    assert format_tool_call(CALL) == CALL_TEXT
    row = to_chat_record({"messages": [{"role": "user", "content": "q"}, message,
                                       {"role": "tool", "content": "11229393"}, {"role": "tool", "content": "2"}]})
    tok = load_tokenizer("builtin")
    messages, tools = prepare_chat(tok, row["messages"])
    assert tools is None and "tool_calls" not in messages[1]
    assert messages[1]["content"] == ("Let me check.\n" + CALL_TEXT + "\n<tool_call>\n"
                                      '{"name": "calculate", "arguments": {"expression": "1 + 1"}}\n</tool_call>')
    assert messages[0] == {"role": "user", "content": "q"}  # no tools: no system message is added


@pytest.mark.parametrize("row_index", [0, 1, 2, 3, 4])
def test_native_tool_template_renders_them_itself_with_the_same_assistant_tokens(
        tok, native, native_plain, row_index):
    record = load_sft_records("builtin:tool_use_sft.jsonl", limit=5)[row_index]
    messages, tools = record["messages"], record["tools"]
    assert prepare_chat(native, messages, tools) == (messages, tools)  # left to the template
    ids, mask = tokenize_chat(native, messages, tools=tools)
    assert ids == native.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]
    text = tok.decode(ids)
    assert "<tools>\n" + json.dumps(tools[0]) in text and "You may call these functions" not in text
    trained, untrained = spans(native, ids, mask), spans(native, ids, mask, False)
    results = [m["content"] for m in messages if m["role"] == "tool"]
    assert all(f"<tool_response>\n{r}\n</tool_response>" in "".join(untrained) for r in results)
    assert not any("tool_response" in s for s in trained)
    # the same assistant tokens as the builtin template with the calls written in (one convention)
    b_ids, b_mask = tokenize_chat(tok, messages, tools=tools)
    assert trained == spans(tok, b_ids, b_mask) and len(trained) == sum(m["role"] == "assistant" for m in messages)
    # the prefix path on the same template gives the same ids and mask
    assert tokenize_chat(native_plain, messages, tools=tools) == (ids, mask)


def test_template_ids_and_rl_prompts_render_tools_like_sft(tok, native):
    prompt = prompt_messages(to_chat_record(ROW), "row", None)
    assert [m["role"] for m in prompt] == ["system", "user"]
    with_tools = template_ids(tok, prompt, add_generation_prompt=True, tools=TOOLS)
    system = {"role": "system", "content": "Use the tool.\n\n" + tools_system_text(TOOLS)}
    assert with_tools == template_ids(tok, [system, prompt[1]], add_generation_prompt=True)
    ids, _ = tokenize_chat(tok, ROW["messages"], tools=TOOLS)
    assert ids[:len(with_tools)] == with_tools  # the RL prompt is the SFT conversation's prefix
    native_ids = template_ids(native, prompt, add_generation_prompt=True, tools=TOOLS)
    assert native_ids == native.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]


def test_a_template_that_drops_tool_results_is_refused(tok):
    dropping = load_tokenizer("builtin")
    dropping.chat_template = tok.chat_template.replace("{%- for message in messages %}",
                                                       "{%- for message in messages if message.role != 'tool' %}")
    assert dropping.chat_template != tok.chat_template
    with pytest.raises(ValueError, match="drops `tool` messages.*renders role 'tool'"):
        tokenize_chat(dropping, to_chat_record(ROW)["messages"])


# ---------------------------------------------------------------- rows


def test_tool_rows_are_normalized():
    row = {"messages": [{"role": "user", "content": "q", "tool_calls": None, "name": None},
                        {"role": "assistant", "content": None,
                         "tool_calls": [{"name": "calculate", "arguments": '{"expression": "1 + 1"}'}]},
                        {"role": "tool", "content": "2", "tool_call_id": None},
                        {"role": "assistant", "content": "<answer>2</answer>", "tool_calls": []}],
           "tools": json.dumps([TOOLS[0]["function"]]), "id": 3}
    record = to_chat_record(row)
    assert record["id"] == 3 and record["tools"] == TOOLS
    assert record["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "1 + 1"}}}]},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "<answer>2</answer>"}]
    assert "tools" not in to_chat_record({"messages": ROW["messages"]})
    completion = to_chat_record({"prompt": "What is 3847 * 2919?", "completion": ROW["messages"][2:], "tools": TOOLS})
    assert [m["role"] for m in completion["messages"]] == ["user", "assistant", "tool", "assistant"]


def _with(index: int, **changes) -> dict:
    messages = [dict(m) for m in ROW["messages"]]
    messages[index] = {k: v for k, v in {**messages[index], **changes}.items() if v is not ...}
    return {"messages": messages, "tools": TOOLS}


@pytest.mark.parametrize("row, error", [
    (_with(1, tool_calls=[CALL]), r"message 1: only assistant messages may have `tool_calls` \(this one is 'user'\)"),
    (_with(2, tool_calls=CALL), r"message 2: `tool_calls` must be a list of calls"),
    (_with(2, tool_calls=["calculate"]), r"message 2 tool call 0: a tool call must be an object"),
    (_with(2, tool_calls=[{"type": "function", "function": {"arguments": {}}}]), r"needs `function.name`"),
    (_with(2, tool_calls=[{"type": "code", "code": "1"}]), r"only tool calls of type 'function'"),
    (_with(2, tool_calls=[{"name": "calculate", "arguments": "{oops"}]), r"are a string that is not valid JSON"),
    (_with(2, tool_calls=[{"name": "calculate", "arguments": [1]}]), r"must be a JSON object"),
    (_with(2, tool_calls=[{"name": "calculate", "arguments": {}, "id": 7}]), r"a tool call `id` must be a string"),
    (_with(2, tool_calls=[{"name": "search", "arguments": {}}]), r"calls tool 'search', which is not in the row's"),
    (_with(2, tool_calls=..., content=...), r"message 2 needs a string `role` and a string `content` \(an assistant"),
    (_with(3, content={"value": 11229393}), r"message 3: a `tool` message needs a string `content`.*json.dumps"),
    (_with(3, name="search"), r"message 3: this tool result is from 'search', but .* called \['calculate'\]"),
    (_with(3, name=5), r"a tool message's `name` must be a string"),
    ({"messages": [ROW["messages"][1], ROW["messages"][3], ROW["messages"][4]]},
     r"message 1: a `tool` message must follow an assistant message with `tool_calls`"),
    ({"messages": [ROW["messages"][1], {"role": "assistant", "content": "", "tool_calls": [{**CALL, "id": "c1"}]},
                   {"role": "tool", "content": "1", "tool_call_id": "c2"}]},
     r"tool_call_id 'c2' answers no call .* \['c1'\]"),
    ({**ROW, "tools": {"calculate": {}}}, r"`tools` must be a list of function schemas"),
    ({**ROW, "tools": "[oops"}, r"`tools` is a string that is not valid JSON"),
    ({**ROW, "tools": [{"type": "function", "function": {"description": "x"}}]}, r"tools\[0\] must be"),
])
def test_malformed_tool_rows_fail_with_the_fix_named(row, error):
    with pytest.raises(ValueError, match=error):
        to_chat_record(row, "d.jsonl row 4")
    with pytest.raises(ValueError, match="d.jsonl row 4"):
        to_chat_record(row, "d.jsonl row 4")


# ---------------------------------------------------------------- plain rows: unchanged

# Observed with the code BEFORE tool support (the unmodified records.py / chat.py), as a regression guard:
# rows 0-2 of assets/sft_tasks.jsonl through the builtin tokenizer (ids and the [start, end) of the loss tokens),
# and a digest of ids + masks of the first 64 rows at max_len=512 (the same with and without {% generation %}).
PLAIN_IDS = [
    ([1, 309, 202, 305, 277, 312, 17, 311, 277, 308, 287, 300, 299, 268, 310, 268, 33, 17, 2, 202, 1, 307, 202, 360,
      277, 332, 326, 334, 68, 70, 93, 5, 17, 2, 202, 1, 313, 202, 68, 337, 384, 335, 384, 337, 336, 202, 31, 268, 33,
      93, 70, 68, 280, 268, 33, 2, 202], (38, 56)),
    ([1, 309, 202, 305, 277, 312, 17, 311, 277, 308, 287, 300, 299, 268, 310, 268, 33, 17, 2, 202, 1, 307, 202, 352,
      356, 277, 332, 326, 334, 89, 90, 70, 5, 17, 2, 202, 1, 313, 202, 89, 345, 337, 335, 337, 373, 345, 202, 31, 268,
      33, 70, 89, 90, 280, 268, 33, 2, 202], (39, 57)),
    ([1, 309, 202, 305, 277, 312, 17, 311, 277, 308, 287, 300, 299, 268, 310, 268, 33, 17, 2, 202, 1, 307, 202, 321,
      320, 224, 28, 27, 331, 224, 23, 24, 34, 2, 202, 1, 313, 202, 28, 27, 331, 224, 23, 24, 323, 224, 20, 23, 22, 202,
      31, 268, 33, 20, 23, 22, 280, 268, 33, 2, 202], (38, 60)),
]
PLAIN_PROMPT_IDS = [1, 309, 202, 305, 277, 312, 17, 311, 277, 308, 287, 300, 299, 268, 310, 268, 33, 17, 2, 202, 1,
                    307, 202, 360, 277, 332, 326, 334, 68, 70, 93, 5, 17, 2, 202, 1, 313, 202]
PLAIN_DIGEST = "12d5f7222ce379366b4600ca6e5680b3f05a2bb726d324860af85af1367ea1a4"


def test_plain_rows_tokenize_exactly_as_before(tok, builtin_plain):
    rows = load_sft_records("builtin", limit=64)
    for row, (expected, (start, end)) in zip(rows, PLAIN_IDS):
        ids, mask = tokenize_chat(tok, row["messages"])
        assert ids == expected and mask == [start <= i < end for i in range(len(ids))]
        assert prepare_chat(tok, row["messages"]) == (row["messages"], None)
    assert template_ids(tok, rows[0]["messages"][:2], add_generation_prompt=True) == PLAIN_PROMPT_IDS
    for t in (tok, builtin_plain):
        docs = tokenize_sft_records(t, rows, max_len=512)
        digest = hashlib.sha256(json.dumps([[d.input_ids, d.loss_mask] for d in docs]).encode()).hexdigest()
        assert digest == PLAIN_DIGEST


# ---------------------------------------------------------------- the bundled example


def test_bundled_tool_use_example_is_generated_and_loads_through_the_sft_data_path(tok, caplog):
    assert TOOL_USE_SFT_FILE.stat().st_size < 50_000
    assert [json.loads(line) for line in TOOL_USE_SFT_FILE.read_text().splitlines()] == tool_use_sft_rows(), \
        "regenerate: records._write_jsonl(tool_use_sft_rows(), TOOL_USE_SFT_FILE)"
    records = load_sft_records("builtin:tool_use_sft.jsonl")
    assert len(records) == 40 and read_rl_rows("builtin:tool_use_sft.jsonl", limit=3) == tool_use_sft_rows()[:3]
    assert {len([m for m in r["messages"] if m["role"] == "tool"]) for r in records} == {0, 1, 2}

    from trainer.sft import build_sft_loader
    from tests.test_sft import compose_cfg

    cfg = compose_cfg(["data.source=builtin:tool_use_sft.jsonl", "data.seq_len=1024"])
    trainer = SimpleNamespace(tokenizer=tok, dims=SimpleNamespace(dp_rank=0, dp=1), cfg=cfg)
    with caplog.at_level("WARNING"):
        loader = build_sft_loader(cfg, trainer)
    assert not caplog.records, "every bundled row fits data.seq_len=1024 whole"
    batch = loader.next_batch()
    assert batch.input_ids.shape == (cfg.data.micro_batch_size, 1024) and int((batch.labels != -100).sum()) > 0
    for record in records:
        ids, mask = tokenize_chat(tok, record["messages"], tools=record["tools"])
        trained = "".join(spans(tok, ids, mask))
        assert trained.endswith(f"<answer>{record['answer']}</answer><|im_end|>")
        calls = [c for m in record["messages"] for c in m.get("tool_calls", ())]
        assert trained.count(TOOL_CALL_OPEN) == len(calls) and "<|im_start|>" not in trained
        assert [format_tool_call(c) in trained for c in calls] == [True] * len(calls)
        untrained = "".join(spans(tok, ids, mask, False))
        assert all(f"<|im_start|>tool\n{m['content']}<|im_end|>" in untrained
                   for m in record["messages"] if m["role"] == "tool")
    with caplog.at_level("WARNING"):
        tokenize_sft_records(tok, records[:5], max_len=512)
    assert "longer than 512 tokens and were cut" in caplog.text


def test_missing_builtin_file_names_the_bundled_ones():
    with pytest.raises(FileNotFoundError, match="no bundled file 'nope.jsonl'.*builtin:tool_use_sft.jsonl"):
        load_sft_records("builtin:nope.jsonl")
