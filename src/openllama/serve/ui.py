"""The Gradio chat page (mounted at `/` by `serve.app`).

Two tabs on the same engine as the HTTP API (same queue, same limits, same chat template):
- Chat: multi-turn with streaming; the chatbot's own buttons retry the last reply, undo and
  clear; a system prompt and the generation settings sit in an accordion below. The history is
  trimmed from the oldest turn when it outgrows the context, and "Max new tokens" is an upper
  bound: a reply gets what the context leaves after the prompt (so the defaults work with a
  256-token model). An error (a message that cannot fit, a full queue) is shown as a marked
  reply, never raised: Gradio's ChatInterface leaves its input box disabled after a raised
  error. Marked replies and the message that caused them are left out of later prompts.
- Single turn: one prompt -> one streamed reply, either as a one-message chat (the template) or
  as a raw completion of the text.
API names for gradio_client: `/respond` (chat) and `/answer` (single turn).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local server

import gradio as gr  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..generate import SamplingParams  # noqa: E402
from .engine import Engine, ServerBusy  # noqa: E402
from .prompting import message_text  # noqa: E402

UPDATE_INTERVAL = 0.05  # seconds between streamed updates of a reply on the page
ERROR_TITLE = "⚠️ Error"  # the metadata title that marks an error reply


def _settings(engine: Engine) -> list:
    top = engine.limits.max_new_tokens
    return [
        gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)", render=False),
        gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top p", render=False),
        gr.Slider(1, top, value=min(256, top), step=1, label="Max new tokens", render=False),
    ]


def _is_error(m) -> bool:
    meta = m.get("metadata") if isinstance(m, dict) else getattr(m, "metadata", None)
    return isinstance(meta, dict) and meta.get("title") == ERROR_TITLE


def _history_messages(history: list) -> list[dict]:
    """The page's history as chat messages, without error replies and the messages that caused them."""
    out = []
    for m in history or []:
        if _is_error(m):
            if out and out[-1]["role"] == "user":
                out.pop()
            continue
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("user", "assistant"):
            out.append({"role": role, "content": message_text(m.get("content"))})
    return out


def _error_reply(exc: Exception) -> gr.ChatMessage:
    return gr.ChatMessage(role="assistant", content=str(exc) or type(exc).__name__, metadata={"title": ERROR_TITLE})


def build_ui(engine: Engine) -> gr.Blocks:
    async def run(prompt_ids: list[int], temperature: float, top_p: float, max_tokens: int, strip_prefix: str = ""):
        params = SamplingParams(max_new_tokens=engine.reply_budget(prompt_ids, max_tokens),
                                temperature=float(temperature), top_p=max(float(top_p), 1e-6))
        text, shown, last = "", None, 0.0
        async for pieces in engine.stream(engine.start([prompt_ids], params, strip_prefix=strip_prefix)):
            text += pieces[0]
            # every update re-sends the whole reply: a few per second stream smoothly and
            # keep the page's work small however fast the tokens come
            if text != shown and time.monotonic() - last >= UPDATE_INTERVAL:
                shown, last = text, time.monotonic()
                yield text
        if text != shown:
            yield text

    async def respond(message: str, history: list, system: str, temperature: float, top_p: float, max_tokens: int):
        try:
            messages = ([{"role": "system", "content": system}] if system and system.strip() else [])
            messages += _history_messages(history) + [{"role": "user", "content": message_text(message)}]
            kept, ids, _ = engine.fit_chat(messages, int(max_tokens))
            async for text in run(ids, temperature, top_p, max_tokens, engine.prompter.reply_prefix(kept)):
                yield text
        except Exception as exc:  # shown, not raised: a raised error leaves the input box disabled
            yield _error_reply(exc)

    async def answer(prompt: str, raw: bool, temperature: float, top_p: float, max_tokens: int):
        try:
            prefix = ""
            if raw:
                ids = engine.encode_text(prompt)
            else:
                kept, ids, _ = engine.fit_chat([{"role": "user", "content": prompt}], int(max_tokens))
                prefix = engine.prompter.reply_prefix(kept)
            async for text in run(ids, temperature, top_p, max_tokens, prefix):
                yield text
        except (UserError, ServerBusy) as exc:
            gr.Warning(str(exc))
            yield f"Error: {exc}"

    with gr.Blocks(title=f"openllama - {engine.model_name}") as blocks:
        gr.Markdown(f"### openllama &middot; `{engine.model_name}` &middot; context {engine.context} tokens")
        with gr.Tab("Chat"):
            system = gr.Textbox(label="System prompt", value="", lines=2, render=False)
            gr.ChatInterface(
                respond,
                chatbot=gr.Chatbot(label="Chat", height=420),
                textbox=gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                   elem_id="chat-input", submit_btn=True, stop_btn=True),
                additional_inputs=[system, *_settings(engine)],
                additional_inputs_accordion="Generation settings",
                api_name="respond",
                fill_height=False,
            )
        with gr.Tab("Single turn"):
            prompt = gr.Textbox(label="Prompt", lines=4, elem_id="single-prompt")
            raw = gr.Checkbox(label="Raw completion (no chat template)", value=False)
            settings = _settings(engine)
            with gr.Accordion("Generation settings", open=False):
                for s in settings:
                    s.render()
            go = gr.Button("Generate", variant="primary")
            reply = gr.Textbox(label="Reply", lines=8, interactive=False, elem_id="single-reply")
            go.click(answer, [prompt, raw, *settings], reply, api_name="answer")
    return blocks
