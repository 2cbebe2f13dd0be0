"""SFT conversations -> token ids and the loss mask, through the tokenizer's chat template.

    {"messages": [...]} (trainer/data/records.py)
      ─ tokenize_sft_records(tok, rows, max_len) ─> [TokenizedDoc(input_ids, loss_mask)]
           tokenize_chat: the chat template; loss mask = assistant tokens incl. their <|im_end|>
           ({% generation %} blocks when the template has them, else rendered-prefix lengths)
           tool use: a row's `tools` go to apply_chat_template(tools=...) in every rendering; tool results
           (role "tool") are never loss tokens; prepare_chat handles templates that ignore tool_calls / tools
      ─ shifted_labels(ids, mask) ─> labels[t] = ids[t+1] where t+1 is a loss token, else -100
                                     (per document: no token learns across a document boundary)
    template_ids(tok, messages, add_generation_prompt, tools)   the plain rendering (RL prompts: trainer/rl/prompts.py)

Templates without tool support (found by rendering, per conversation: a template "ignores tool_calls" when the
conversation renders the same with and without them, and "ignores tools" when it renders the same with tools=None)
get the Hermes / Qwen convention written into the text instead, so nothing is silently dropped:
    assistant tool calls -> appended to the assistant content, one block per call, after the text and a newline:
        <tool_call>
        {"name": "calculate", "arguments": {"expression": "3847 * 2919"}}
        </tool_call>
    row `tools`          -> a "# Tools" block with one JSON schema per line inside <tools></tools>, appended to the
                            system message (a system message is added when there is none)
A template that drops `tool` messages altogether is refused (the model would learn to answer without the results).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cp.documents import IGNORE_INDEX  # the one definition (cp.documents)

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"  # Hermes / Qwen: what the RL side parses
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedDoc:
    """One tokenised conversation: token ids and which of them are training targets."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template (a named set's "default"); refused when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, which the "
                         "trainers format SFT rows and RL prompts with: set data.tokenizer to one that has a chat "
                         "template (an instruct model's, or builtin for tiny:* models)")
    return template if isinstance(template, str) else template.get("default", next(iter(template.values())))


def _render_ids(tokenizer, messages: list[dict], tools: list | None, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def _render_text(tokenizer, messages: list[dict], tools: list | None) -> str | None:
    """The rendered text, or None when the template refuses this conversation."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception:  # jinja's TemplateError and whatever a template's raise_exception raises
        return None


def format_tool_call(call: dict) -> str:
    """One tool call (OpenAI {"function": {"name", "arguments"}} or flat {"name", "arguments"}) in the Hermes /
    Qwen text convention: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    body = json.dumps({"name": function["name"], "arguments": {} if arguments is None else arguments},
                      ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tools_system_text(tools: list) -> str:
    """The "# Tools" block written into the system message for templates that ignore `tools=`."""
    schemas = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (f"# Tools\n\nYou may call these functions:\n{TOOLS_OPEN}\n{schemas}\n{TOOLS_CLOSE}\n"
            f"For each call, return a JSON object with the function name and arguments within "
            f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} tags:\n"
            f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}')


def _inline_tool_calls(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    content = message.get("content") or ""
    text = "\n".join(([content] if content else []) + [format_tool_call(c) for c in message["tool_calls"]])
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": text}


def _tools_in_system(messages: list[dict], tools: list) -> list[dict]:
    block = tools_system_text(tools)
    if messages and messages[0]["role"] == "system":
        content = messages[0].get("content") or ""
        return [{**messages[0], "content": f"{content}\n\n{block}" if content else block}] + messages[1:]
    return [{"role": "system", "content": block}] + messages


def prepare_chat(tokenizer, messages: list[dict], tools: list | None = None) -> tuple[list[dict], list | None]:
    """(messages, tools) to render: unchanged when the template renders tool calls and tools itself (or the row
    has neither); otherwise the calls and / or the tool schemas are written into the text in the Hermes / Qwen
    convention (module docstring). Decided by rendering this conversation, not by guessing from the template."""
    has_calls = any(m.get("tool_calls") for m in messages)
    has_results = any(m.get("role") == "tool" for m in messages)
    if not (has_calls or tools or has_results):
        return messages, tools  # a plain conversation: rendered exactly as before
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)  # its own errors surface here
    if has_results and _render_text(tokenizer, [m for m in messages if m.get("role") != "tool"], tools) == rendered:
        raise ValueError("the chat template drops `tool` messages (the conversation renders the same without them), "
                         "so the model would learn to answer without the tool results: use a chat template that "
                         "renders role 'tool' (set data.tokenizer to one, or set tokenizer.chat_template)")
    if has_calls and _render_text(tokenizer, [{k: v for k, v in m.items() if k != "tool_calls"}
                                              for m in messages], tools) == rendered:
        messages = [_inline_tool_calls(m) for m in messages]  # the template ignores tool_calls
        rendered = _render_text(tokenizer, messages, tools)
    if tools and _render_text(tokenizer, messages, None) == rendered:
        messages, tools = _tools_in_system(messages, tools), None  # the template ignores tools=
    return messages, tools


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                 tools: list | None = None) -> list[int]:
    """The token ids of `messages` (and a row's `tools`) through the chat template (see prepare_chat)."""
    messages, tools = prepare_chat(tokenizer, messages, tools)
    return _render_ids(tokenizer, messages, tools, add_generation_prompt)


def _assistant_mask_by_prefixes(tokenizer, messages: list[dict], ids: list[int],
                                tools: list | None = None) -> list[bool]:
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
        before = _render_ids(tokenizer, messages[:i], tools, add_generation_prompt=True)
        through = _render_ids(tokenizer, messages[:i + 1], tools)
        start, end = len(before), len(through)
        if ids[:start] != before or ids[:end] != through or start > end:
            raise ValueError("the chat template renders a conversation prefix differently from the whole "
                             "conversation, so assistant tokens cannot be located: use a template with "
                             "{% generation %} blocks (e.g. the builtin tokenizer)")
        if eos is not None and eos in through[start:end]:
            end = start + max(j for j, t in enumerate(through[start:end]) if t == eos) + 1
        mask[start:end] = [True] * (end - start)
    return mask


def tokenize_chat(tokenizer, messages: list[dict], max_len: int | None = None,
                  tools: list | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of `messages` (with a row's `tools`) through the tokenizer's chat template and the loss mask:
    True on assistant tokens (content, tool calls as rendered, and the closing <|im_end|>), False on
    system/user/tool-result/template tokens. Both are truncated to max_len."""
    template = chat_template(tokenizer)
    messages, tools = prepare_chat(tokenizer, messages, tools)
    if _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    else:
        ids = _render_ids(tokenizer, messages, tools)
        mask = _assistant_mask_by_prefixes(tokenizer, messages, ids, tools)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def tokenize_sft_records(tokenizer, records: Sequence[dict], max_len: int | None = None) -> list[TokenizedDoc]:
    """tokenize_chat over records (with each row's `tools`); rows left without any loss token (no assistant
    turn, or truncated away) are dropped with a warning, and rows cut at max_len are counted in one."""
    docs, cut = [], 0
    for record in records:
        ids, mask = tokenize_chat(tokenizer, record["messages"], tools=record.get("tools"))
        if max_len is not None and len(ids) > max_len:
            ids, mask, cut = ids[:max_len], mask[:max_len], cut + 1
        if any(mask):
            docs.append(TokenizedDoc(ids, mask))
    if cut:
        log.warning("%d of %d rows are longer than %d tokens and were cut (their tail is not trained): raise "
                    "data.seq_len to keep them whole", cut, len(records), max_len)
    if len(docs) < len(records):
        log.warning("dropped %d of %d rows with no assistant token to train on", len(records) - len(docs), len(records))
    return docs


def shifted_labels(input_ids: Sequence[int], loss_mask: Sequence[bool]) -> list[int]:
    """labels[t] = input_ids[t+1] if token t+1 is a loss token, else -100; the last is -100."""
    if not input_ids:
        return []
    labels = [int(input_ids[t + 1]) if loss_mask[t + 1] else IGNORE_INDEX for t in range(len(input_ids) - 1)]
    return labels + [IGNORE_INDEX]
