"""`openllama serve --model DIR`: the OpenAI-compatible API and the Gradio chat in one process.

Routes: /v1/chat/completions, /v1/completions, /v1/models (the API, see `serve.api`), /health,
and the chat page at / (see `serve.ui`). Safe defaults: it listens on 127.0.0.1 only; with
`--api-key` (or $OPENLLAMA_API_KEY) every /v1 request needs `Authorization: Bearer <key>` and the
chat page asks for the key as its password. Requests are decoded together by one continuous-
batching scheduler (`serve.scheduler`): `--max-concurrent` sequences in one batch, `--max-queue`
requests waiting, beyond that 429 with Retry-After.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

import torch
from fastapi import FastAPI

from ..generate import add_model_arguments, apply_threads, load_for_inference
from .api import create_api
from .engine import Engine, Limits


def build_app(engine: Engine, api_key: str | None = None, ui: bool = True) -> FastAPI:
    app = create_api(engine, api_key)
    if ui:
        import gradio as gr

        from .ui import build_ui

        auth = None
        if api_key:
            def auth(username: str, password: str) -> bool:  # any user name, the API key as password
                return secrets.compare_digest(password.encode(), api_key.encode())
        app = gr.mount_gradio_app(app, build_ui(engine), path="/", auth=auth, ssr_mode=False,
                                  footer_links=["api"])
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("OPENLLAMA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $OPENLLAMA_API_KEY)")
    parser.add_argument("--name", help="model name in the API (default: the model directory's name)")
    parser.add_argument("--chat-template", help="template name (default, chatml), .jinja file or jinja text "
                                                "(default: the tokenizer's)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context - 1")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="cap on max_tokens per request")
    parser.add_argument("--max-concurrent", type=int, default=64,
                        help="sequences decoded together in one batch (KV-cache slots; n > 1 takes n)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for slots; beyond: 429")
    parser.add_argument("--max-batch", type=int, default=16, help="cap on n x prompts in one request")
    parser.add_argument("--no-ui", action="store_true", help="serve the API only")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    chat_template = None
    if args.chat_template:
        from ..chat_template import template_source

        chat_template = template_source(args.chat_template)
    apply_threads(args)
    loaded = load_for_inference(args.model, args.device, args.dtype)
    if args.threads is None and loaded.model.output.weight.device.type == "cpu":
        # leave a core to the event loop: torch's OpenMP threads spin while they wait, and with
        # every core taken the scheduler thread and the HTTP loop starve each other (measured on
        # 2 cores: 1 thread ~400 tokens/s for one client, 2 threads under other load ~10)
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_concurrent=args.max_concurrent, max_queue=args.max_queue, max_batch=args.max_batch)
    engine = Engine(loaded, limits, compile=args.compile, chat_template=chat_template, name=args.name)
    app = build_app(engine, api_key=args.api_key, ui=not args.no_ui)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    cfg, itemsize = engine.generator.cfg, engine.generator.dtype.itemsize
    kv_gib = limits.max_concurrent * engine.context * cfg.n_layers * 2 * cfg.kv_heads * cfg.head_dim * itemsize / 2**30
    print(f"serving {engine.model_name} (context {engine.context}) on http://{args.host}:{args.port}  "
          f"API: /v1  chat page: {'/' if not args.no_ui else 'off'}  batch: {limits.max_concurrent} sequences "
          f"(KV cache grows with use, at most {kv_gib:.2f} GiB)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    engine.close()
    return 0
