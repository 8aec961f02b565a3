"""Chat templates: the jinja text a tokenizer carries, rendered as transformers renders it, and
tokenised with the loss on assistant replies only.

The default template is the seed project's: `user: {prompt}\\nsystem: {completion}</s>` (the seed
calls the assistant "system"), after the BOS token every pretraining document starts with. A
conversation renders turn after turn; a system message, if any, is a plain line before the first
turn.

A foundation module: the tokenizer writes the default template into tokenizer_config.json, so this
imports nothing from data/, train/, serve/ (only errors and labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

# Jinja, as transformers' `apply_chat_template` runs it; written into tokenizer_config.json.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'user: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'system: ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'system: ' }}{% endif %}"
)

# A ChatML-like alternative (role headers between <|im_start|> / <|im_end|> markers, as plain text
# unless the tokenizer has them as special tokens); the reply is closed by `<|im_end|>` + eos.
CHATML_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_end|>' + eos_token + '\n' }}"
    "{% else %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_TEMPLATES = {"default": DEFAULT_CHAT_TEMPLATE, "seed": DEFAULT_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}


def template_source(name_or_path: str | None) -> str:
    """A template by name (default, seed, chatml), from a .jinja file, or the jinja text itself."""
    if not name_or_path:
        return DEFAULT_CHAT_TEMPLATE
    if name_or_path in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_path]
    if "{%" in name_or_path or "{{" in name_or_path:
        return name_or_path
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise UserError(f"chat template {name_or_path!r}: not a template name ({', '.join(CHAT_TEMPLATES)}) "
                    f"nor a file")


@dataclass
class Example:
    """One tokenised conversation: `labels[i]` is ids[i] where token i is trained, else IGNORE_INDEX.
    `turn_ends` are token counts at which an assistant turn ends (safe truncation points)."""

    ids: list[int]
    labels: list[int]
    turn_ends: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def special_token_strings(tokenizer: Any) -> dict[str, str]:
    """bos/eos/pad text as the template sees them (transformers passes special_tokens_map)."""
    out = {}
    to_text = getattr(tokenizer, "id_to_token", None) or getattr(tokenizer, "id_to_piece", None)
    for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", None)):
        value = getattr(tokenizer, name, None)
        ident = getattr(tokenizer, name.replace("_token", "_id"), None)
        if not isinstance(value, str) and to_text is not None and isinstance(ident, int) and ident >= 0:
            value = to_text(ident)
        value = value if isinstance(value, str) else default
        if value is not None:
            out[name] = value
    return out


class ChatTemplate:
    """Renders conversations with a jinja chat template exactly as transformers does (same
    function, same special-token variables) and tokenises them with loss on assistant replies."""

    def __init__(self, source: str | None = None, special_tokens: dict[str, str] | None = None):
        self.source = template_source(source)
        self.special_tokens = dict(special_tokens or {"bos_token": "<s>", "eos_token": "</s>"})

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, source: str | None = None) -> "ChatTemplate":
        return cls(source, special_token_strings(tokenizer))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template([list(messages)], chat_template=self.source,
                                                add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except Exception as exc:  # jinja syntax/runtime errors in a user template
            raise UserError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None
        return rendered[0]

    def assistant_spans(self, messages: Sequence[dict], only_last: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character span of each assistant reply: from the end of the
        generation prompt before it (less trailing whitespace) to the end of the rendered reply (so
        the closing eos counts).
        Needs a template where each turn only appends text, which every chat template does."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or (only_last and i != len(messages) - 1):
                continue
            start_text = self.render(messages[:i], add_generation_prompt=True)
            end_text = self.render(messages[: i + 1])
            if not text.startswith(end_text) or not end_text.startswith(start_text):
                raise UserError("chat template is not incremental (rendering a prefix of a conversation must give "
                                "a prefix of the text), so replies cannot be located for the loss mask")
            # whitespace ending the generation prompt (the space after "system:") belongs to the reply:
            # tokenizers attach it to the next word, and `generation_ids` leaves it to the model
            spans.append((len(start_text.rstrip()), len(end_text)))
        return text, spans

    def generation_ids(self, messages: Sequence[dict], tokenizer: Any) -> list[int]:
        """Prompt ids for sampling a reply: the conversation + the generation prompt, without the
        trailing whitespace-only tokens, which training counts as the start of the reply (so the
        model continues exactly as it learned to, e.g. with the token "▁d" after "system:")."""
        text = self.render(messages, add_generation_prompt=True)
        ids, offsets = tokenizer.encode_with_offsets(text)
        keep = len(ids)
        stripped = len(text.rstrip())
        while keep and offsets[keep - 1][0] >= stripped:
            keep -= 1
        return list(ids[:keep])

    def encode(self, conversation: Any, tokenizer: Any, only_last: bool = False) -> Example:
        """Tokenise the whole rendered text once (so ids equal `apply_chat_template(tokenize=True)`);
        a token is trained when its characters overlap an assistant span. `conversation` is a
        message list or anything with `.messages` (data.chat.Conversation)."""
        # imported here: labels imports torch, and the tokenizer (which imports this module for
        # its default template) is loaded by data workers that never need torch
        from .labels import IGNORE_INDEX

        messages = list(getattr(conversation, "messages", conversation))
        text, spans = self.assistant_spans(messages, only_last=only_last)
        ids, offsets = tokenizer.encode_with_offsets(text)
        labels = [IGNORE_INDEX] * len(ids)
        turn_ends = []
        k = 0
        for start, end in spans:
            while k < len(ids) and offsets[k][1] <= start:
                k += 1
            while k < len(ids) and offsets[k][0] < end:
                labels[k] = ids[k]
                k += 1
            turn_ends.append(k)
        return Example(list(ids), labels, turn_ends)
