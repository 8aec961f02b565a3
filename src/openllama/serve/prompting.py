"""Conversations -> prompt token ids, with the same chat template training used.

The template is the tokenizer's (`chat_template` in tokenizer_config.json, or chat_template.jinja,
as `openllama tokenizer` and `openllama export` write them; the project default otherwise) and is
rendered by `chat_template.ChatTemplate`, the renderer SFT uses, so a served prompt is token for
token what the model saw in training. When a conversation outgrows the
context, whole turns are dropped from the oldest on; system messages stay while they can.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..chat_template import ChatTemplate
from ..errors import UserError

ROLES = ("system", "user", "assistant")


class PromptTooLong(UserError):
    """The prompt does not fit the context (or the server's prompt limit) even after truncation."""


def message_text(content: Any) -> str:
    """Message content as plain text: a string, or OpenAI/Gradio content parts with text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise UserError("only text content is supported in messages")
        return "".join(texts)
    if content is None:
        return ""
    raise UserError(f"message content must be text (got {type(content).__name__})")


class ChatPrompter:
    """Renders and tokenises conversations for generation (ending with the assistant's cue)."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = ChatTemplate.for_tokenizer(tokenizer, template or getattr(tokenizer, "chat_template", None))

    def render(self, messages: Sequence[dict]) -> str:
        return self.template.render(messages, add_generation_prompt=True)

    def encode(self, messages: Sequence[dict]) -> list[int]:
        """Prompt ids as SFT trained them: the template's trailing whitespace (the space in
        `system: `) is left to the reply, see `ChatTemplate.generation_ids`."""
        return self.template.generation_ids(messages, self.tokenizer)

    def reply_prefix(self, messages: Sequence[dict]) -> str:
        """The text a reply starts with that the rendered prompt already shows (e.g. ' '):
        generated, but not part of the reply's content."""
        text = self.render(messages)
        return text[len(text.rstrip()):]

    def fit(self, messages: Sequence[dict], budget: int) -> tuple[list[dict], list[int], int]:
        """Drop the oldest turns until the prompt has <= `budget` tokens.

        Returns (kept messages, their ids, number of messages dropped). Leading system messages
        go only when the last user turn alone still does not fit with them."""
        messages = [dict(m) for m in messages]
        head = []
        while messages and messages[0]["role"] == "system":
            head.append(messages.pop(0))
        rest = messages
        dropped = 0
        while True:
            ids = self.encode(head + rest)
            if len(ids) <= budget:
                return head + rest, ids, dropped
            # the oldest turn: from the first message up to (not including) the next user message
            nxt = next((j for j in range(1, len(rest)) if rest[j]["role"] == "user"), None)
            if nxt is not None:
                rest, dropped = rest[nxt:], dropped + nxt
            elif head:
                head, dropped = [], dropped + len(head)
            else:
                raise PromptTooLong(f"the last message alone is {len(ids)} tokens; at most {budget} fit "
                                    f"in the context with room for the reply")
