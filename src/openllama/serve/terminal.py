"""`openllama chat --model DIR`: a multi-turn chat in the terminal, replies streamed as they come.

Commands: /reset forgets the conversation, /quit (or end of input) leaves. The prompt is built
with the tokenizer's chat template, as in training and in `openllama serve`; when the history
outgrows the context the oldest turns are dropped (a note on stderr says so). Replies are decoded
by the server's engine (`serve.scheduler.Scheduler`), so the terminal, the API and the chat page
share one decode path.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Iterator, TextIO

from ..generate import (Generator, SamplingParams, add_model_arguments, add_sampling_arguments, apply_threads,
                        load_for_inference, sampling_from_args)
from .prompting import ChatPrompter
from .scheduler import Scheduler


class ChatSession:
    """A conversation with one model: `send(text)` streams the reply and remembers both turns.
    `generator`: a `Scheduler` (what `openllama chat` runs) or a `Generator` (same decode core, in
    this thread): anything with `.stream(prompt, params, strip_prefix)` and `.max_seq_len`."""

    def __init__(self, generator: Scheduler | Generator, prompter: ChatPrompter, params: SamplingParams,
                 system: str = ""):
        self.generator, self.prompter, self.params = generator, prompter, params
        self.system = system
        self.history: list[dict] = []
        self.dropped = 0  # messages dropped by the last send to fit the context

    def reset(self) -> None:
        self.history = []

    def send(self, text: str) -> Iterator[str]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        messages = head + self.history + [{"role": "user", "content": text}]
        context = self.generator.max_seq_len
        budget = context - min(self.params.max_new_tokens, context // 2)
        kept, ids, self.dropped = self.prompter.fit(messages, budget)
        params = replace(self.params, max_new_tokens=min(self.params.max_new_tokens, context - len(ids)))
        reply = []
        for piece in self.generator.stream(ids, params, strip_prefix=self.prompter.reply_prefix(kept)):
            reply.append(piece)
            yield piece
        self.history = [m for m in kept if m["role"] != "system"] + [{"role": "assistant", "content": "".join(reply)}]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default="", help="system prompt")
    add_sampling_arguments(parser)


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        command = text.strip().lower()
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            session.reset()
            stderr.write("[conversation reset]\n")
            continue
        stdout.write("model> ")
        stdout.flush()
        for piece in session.send(text):
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        if session.dropped:
            stderr.write(f"[dropped the {session.dropped} oldest messages to fit the context]\n")


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    loaded = load_for_inference(args.model, args.device, args.dtype)
    scheduler = Scheduler(Generator(loaded.model, loaded.tokenizer, compile=args.compile), max_slots=1)
    session = ChatSession(scheduler, ChatPrompter(loaded.tokenizer), sampling_from_args(args), system=args.system)
    if sys.stdin.isatty():
        print(f"chatting with {loaded.name}; /reset starts over, /quit leaves", file=sys.stderr)
    try:
        chat_loop(session, sys.stdin, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    finally:
        scheduler.close()
    return 0
