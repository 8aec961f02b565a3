"""The Gradio chat page (mounted at `/` by `serve.app`).

Two tabs on the same engine as the HTTP API (same queue, same limits, same chat template):
- Chat: multi-turn with streaming; the chatbot's own buttons retry the last reply, undo and
  clear; a system prompt and the generation settings sit in an accordion below. The history is
  trimmed from the oldest turn when it outgrows the context.
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


def _settings(engine: Engine) -> list:
    top = engine.limits.max_new_tokens
    return [
        gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)", render=False),
        gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top p", render=False),
        gr.Slider(1, top, value=min(256, top), step=1, label="Max new tokens", render=False),
    ]


def _history_messages(history: list) -> list[dict]:
    out = []
    for m in history or []:
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("user", "assistant"):
            out.append({"role": role, "content": message_text(m.get("content"))})
    return out


def build_ui(engine: Engine) -> gr.Blocks:
    async def run(prompt_ids: list[int], temperature: float, top_p: float, max_tokens: int, strip_prefix: str = ""):
        room = engine.context - len(prompt_ids)
        params = SamplingParams(max_new_tokens=max(1, min(int(max_tokens), room)), temperature=float(temperature),
                                top_p=float(top_p))
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
        except (UserError, ServerBusy) as exc:
            raise gr.Error(str(exc)) from None

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
            raise gr.Error(str(exc)) from None

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
