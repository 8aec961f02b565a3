"""Serving: OpenAI-compatible HTTP API, Gradio chat UI, terminal chat."""
