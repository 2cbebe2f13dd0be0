"""SFT conversations -> token ids and the loss mask, through the tokenizer's chat template.

    {"messages": [...]} (trainer/data/records.py)
      ─ tokenize_sft_records(tok, rows, max_len) ─> [TokenizedDoc(input_ids, loss_mask)]
           tokenize_chat: the chat template; loss mask = assistant tokens incl. their <|im_end|>
           ({% generation %} blocks when the template has them, else rendered-prefix lengths)
      ─ shifted_labels(ids, mask) ─> labels[t] = ids[t+1] where t+1 is a loss token, else -100
                                     (per document: no token learns across a document boundary)
    template_ids(tok, messages, add_generation_prompt)   the plain rendering (RL prompts: trainer/rl/prompts.py)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cp.documents import IGNORE_INDEX  # the one definition (cp.documents)

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")

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


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
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
        before = template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = template_ids(tokenizer, messages[:i + 1])
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
    template = chat_template(tokenizer)
    if _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    else:
        ids = template_ids(tokenizer, messages)
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
