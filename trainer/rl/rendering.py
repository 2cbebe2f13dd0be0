"""Token ids of a multi-turn episode, without ever re-encoding what the model sampled.

    opening(messages)                      the chat template over the opening messages + the generation prompt:
                                           the ids sent to the engine for the first turn
    sampled turn                           the engine's ids exactly as returned, ending in a stop token (end of turn)
    continuation(conversation, replies)    the ids of the environment's reply ONLY:
        without = render(conversation)                         (ends with the model's turn, as the template renders it)
        with    = render(conversation + replies, generation prompt)
        with must extend without exactly (else TemplateError); the reply ids are
            the template's tokens after the model turn's end-of-turn token in `without` (e.g. ChatML's "\\n")
          + with[len(without):]                                 (the replies and the next generation prompt)

The model's turn enters `conversation` as decoded text for the environment to read; its rendering is used only to
find where the replies start, never as training tokens. A template that renders an earlier turn differently once
later turns exist (Qwen3's drops earlier <think> blocks) breaks the prefix property: check_template refuses it at
startup, naming the fix.
"""

from __future__ import annotations

from trainer.data.chat import template_ids

PROBE = [{"role": "system", "content": "You are a probe."}, {"role": "user", "content": "First question?"},
         {"role": "assistant", "content": "<think>\nprobe reasoning\n</think>\n\nFirst answer."}]
PROBE_REPLIES = ({"role": "user", "content": "Follow-up?"}, {"role": "tool", "content": "tool output"})


class TemplateError(ValueError):
    """The chat template cannot give an episode's environment tokens exactly."""


TEMPLATE_FIX = ("set data.chat_template to a Jinja file that renders every earlier turn exactly as it rendered when "
                "it was the latest (for Qwen3-style templates: keep each turn's <think> block), or use "
                "rollout.env=single_turn")


class EpisodeRenderer:
    def __init__(self, tokenizer, stop_ids, tools: list[dict] | None = None):
        """stop_ids: the tokens a sampled turn ends with (trainer/rl/rollout/base.py stop_token_ids); tools: the
        environment's function schemas, rendered by templates that support them."""
        self.tokenizer, self.stop_ids, self.tools = tokenizer, set(stop_ids), tools or None

    def render(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        """The chat template over messages and tools as SFT renders them (a template that ignores tools= gets
        them in the system message: trainer/data/chat.py prepare_chat)."""
        return template_ids(self.tokenizer, messages, add_generation_prompt=generation_prompt, tools=self.tools)

    def opening(self, messages: list[dict]) -> list[int]:
        return self.render(messages, generation_prompt=True)

    def continuation(self, conversation: list[dict], replies: list[dict]) -> list[int]:
        """The ids between the model's end-of-turn token and its next turn: the template's tail of the model's turn,
        the replies, the generation prompt."""
        without = self.render(conversation, generation_prompt=False)
        with_replies = self.render(conversation + replies, generation_prompt=True)
        if with_replies[:len(without)] != without:
            raise TemplateError("the chat template renders the conversation differently once the environment's "
                                "reply is added, so the reply's tokens cannot be told apart from re-rendered earlier "
                                f"turns: {TEMPLATE_FIX}")
        ends = [i for i, token in enumerate(without) if token in self.stop_ids]
        if not ends:
            raise TemplateError("the chat template renders no end-of-turn token after an assistant turn (none of "
                                f"{sorted(self.stop_ids)}): {TEMPLATE_FIX}")
        return without[ends[-1] + 1:] + with_replies[len(without):]


def check_template(tokenizer, stop_ids, tools: list[dict] | None = None) -> None:
    """Startup: a probe conversation (an assistant turn with a <think> block, then a user reply, and with tools a
    tool reply) through
    the chat template must satisfy the prefix property continuation() relies on; else TemplateError naming the
    fix."""
    renderer = EpisodeRenderer(tokenizer, stop_ids, tools)
    for reply in PROBE_REPLIES if tools else PROBE_REPLIES[:1]:  # a tool reply only where there are tools
        try:
            renderer.continuation(list(PROBE), [dict(reply)])
        except Exception as err:  # TemplateError, or the template itself raising on the probe
            raise TemplateError(f"multi-turn episodes need a chat template that extends a conversation without "
                                f"re-rendering it (probe reply role {reply['role']!r}): {err}") from None
