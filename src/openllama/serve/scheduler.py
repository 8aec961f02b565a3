"""Continuous batching: one thread decodes every running request in one batch.

Requests are `Generation`s (a few rows: prompts x n). `submit` queues one and returns a `Ticket`
to read its steps from, in a thread (`for pieces in ticket`) or on the event loop that submitted
it (`async for pieces in ticket`). The scheduler thread loops:

1. drop cancelled requests (a client that went away): their slots are free from this step on;
2. admit waiting requests, oldest first, while their rows fit in the free slots: one prefill
   (`SlotBatch.admit`) and their first tokens go out at once;
3. one decode step (`SlotBatch.step`): ONE forward for every active sequence, each at its own
   length, so 16 users cost one batched forward per token instead of 16;
4. hand every request its new text; a finished request leaves at once (its slots too).

Admission is FIFO and all-or-nothing per request (its rows run in lockstep). A request that
does not fit waits; beyond `max_queue` waiting requests `submit` refuses with `ServerBusy`
(the API answers 429 with Retry-After). Sampling state is per row (its own torch.Generator,
penalties, bias), so what a request gets never depends on what else is running.

The same scheduler serves the HTTP API, the chat page, `openllama chat` and `openllama generate`
(`stream` / `generate` for a caller in a plain thread): one decode path.
"""

from __future__ import annotations

import asyncio
import math
import queue
import sys
import threading
import time
import traceback
from collections import deque
from typing import AsyncIterator, Iterator, Sequence

import torch

from ..errors import UserError
from ..generate import Completion, Generation, Generator, SamplingParams, SlotBatch, StepPieces


class ServerBusy(Exception):
    """Too many requests waiting. `retry_after`: seconds after which a retry may get in."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Ticket:
    """A submitted Generation. Iterate it for its steps (`StepPieces`: one text piece per row);
    iteration ends when the generation does (`generation.completions` is then filled) and raises
    the error if the scheduler failed. Leaving the iteration early cancels it."""

    def __init__(self, scheduler: "Scheduler", generation: Generation, loop: asyncio.AbstractEventLoop | None):
        self.scheduler, self.generation, self.loop = scheduler, generation, loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self.rows = len(generation.rows)
        self.submitted = time.monotonic()

    def _emit(self, event: tuple) -> None:  # called by the scheduler thread
        if self.loop is None:
            self._queue.put(event)
        else:
            _post(self.loop, [(self, event)])

    def cancel(self) -> None:
        """Stop it: its slots are freed at the scheduler's next step (no-op when it has finished)."""
        self.generation.cancel()
        self.scheduler._wake()

    def __iter__(self) -> Iterator[StepPieces]:
        if self.loop is not None:
            raise TypeError("this ticket was submitted from an event loop: use `async for`")
        try:
            while True:
                kind, value = self._queue.get()
                if kind == "step":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[StepPieces]:
        pending, last = None, None
        try:
            while True:
                kind, value = pending or await self._queue.get()
                pending = None
                if kind == "step":
                    interval = self.scheduler.stream_interval()
                    if last is not None and interval:  # busy: let a few tokens gather (never the first text)
                        wait = last + interval - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    # what is queued goes out as one step: fewer, larger chunks (and socket writes,
                    # and client-side parses) exactly when the server is busiest
                    while not self._queue.empty():
                        more = self._queue.get_nowait()
                        if more[0] != "step":
                            pending = more
                            break
                        value = _merge(value, more[1])
                    if any(value):
                        last = time.monotonic()
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self.cancel()


def _merge(a: StepPieces, b: StepPieces) -> StepPieces:
    return StepPieces([x + y for x, y in zip(a, b)], [x + y for x, y in zip(a.logprobs, b.logprobs)])


def _post(loop: asyncio.AbstractEventLoop, events: list[tuple[Ticket, tuple]]) -> None:
    """Hand events to tickets read on `loop`: one wake-up of the loop for all of them (a wake-up
    is a write to the loop's self-pipe; one per request per step was a measurable share of a step)."""
    try:
        loop.call_soon_threadsafe(_put_all, events)
    except RuntimeError:  # the event loop is closed: nobody is listening
        for t, _ in events:
            t.generation.cancel()


def _put_all(events: list[tuple[Ticket, tuple]]) -> None:
    for t, event in events:
        t._queue.put_nowait(event)


class Scheduler:
    """Continuous batching over one `Generator` (see the module docstring). `max_slots`: sequences
    decoded together (KV-cache rows); `max_queue`: requests that may wait for slots;
    `prefill_tokens`: prompt tokens admitted between two decode steps, and padded tokens per
    prefill forward (bounds how long a burst of new requests holds up the running ones' next
    token; a burst is admitted over a few steps)."""

    # When more than BUSY_STREAMS requests run, a stream read on an event loop gets its text at most
    # every STREAM_INTERVAL seconds (the tokens of a few steps per chunk; the first chunk is never
    # held). Each chunk costs the server's event loop and the client a fixed amount of work (JSON,
    # HTTP framing, the openai client's parse: ~0.45 ms of CPU per chunk). Measured with 16 tiny-
    # model streams on 2 cores: one chunk per token 0.22 ms of client CPU per token and ~1,000
    # tokens/s; 25 ms 0.18 ms; 50 ms 0.12 ms and ~1,300 tokens/s. 50 ms (20 updates a second, what
    # the chat page uses) is below what a reader notices.
    BUSY_STREAMS = 3
    STREAM_INTERVAL = 0.05

    def __init__(self, generator: Generator, *, max_slots: int = 64, max_queue: int = 64,
                 prefill_tokens: int = 1024):
        if max_slots < 1 or max_queue < 0:
            raise UserError("scheduler: max_slots must be >= 1 and max_queue >= 0")
        self.generator = generator
        self.max_slots, self.max_queue, self.prefill_tokens = max_slots, max_queue, prefill_tokens
        self.batch = SlotBatch(generator, max_slots, prefill_tokens)
        self._waiting: deque[Ticket] = deque()
        self._active: list[Ticket] = []
        self._used = 0  # slots held by admitted requests (updated under the lock)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._durations: deque[float] = deque(maxlen=32)  # seconds per finished request (Retry-After)
        self.stats = {"running": 0, "waiting": 0, "completed": 0, "cancelled": 0, "failed": 0}

    @property
    def max_seq_len(self) -> int:
        return self.generator.max_seq_len

    # -- submitting ------------------------------------------------------------------------------

    def submit(self, generation: Generation, loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue `generation`; raises ServerBusy when it cannot start now and the queue is full.
        Pass the running event loop (`asyncio.get_running_loop()`) to read it with `async for`."""
        ticket = Ticket(self, generation, loop)
        if ticket.rows > self.max_slots:
            raise UserError(f"{ticket.rows} sequences in one request; this server decodes at most "
                            f"{self.max_slots} at once")
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            queued = sum(t.rows for t in self._waiting)
            if queued + ticket.rows > self.max_slots - self._used and len(self._waiting) >= self.max_queue:
                raise ServerBusy(f"{len(self._waiting)} requests are already waiting; try again later",
                                 self._retry_after())
            self._waiting.append(ticket)
            self.stats["waiting"] = len(self._waiting)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
                self._thread.start()
            self._cv.notify()
        return ticket

    def stream_interval(self) -> float:
        """Seconds a streamed reader waits between chunks (0: each step as it comes)."""
        return self.STREAM_INTERVAL if self.stats["running"] > self.BUSY_STREAMS else 0.0

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean time of recent requests (at least 1)."""
        if not self._durations:
            return 1
        return max(1, math.ceil(sum(self._durations) / len(self._durations)))

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               strip_prefix: str = "") -> Iterator[str]:
        """Text pieces of one prompt, for a caller in a plain thread (`openllama chat`)."""
        generation = self.generator.start([prompt], params or SamplingParams(), strip_prefix=strip_prefix)
        for pieces in self.submit(generation):
            if pieces[0]:
                yield pieces[0]

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                 seeds: Sequence[int | None] | None = None, strip_prefix: str = "") -> list[Completion]:
        generation = self.generator.start(prompts, params or SamplingParams(), seeds, strip_prefix)
        for _ in self.submit(generation):
            pass
        return generation.completions

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # -- the loop (scheduler thread) -------------------------------------------------------------

    def _loop(self) -> None:
        self.generator.model.eval()
        with torch.inference_mode():  # for this thread's whole life: no autograd bookkeeping per step
            while self._next_cycle():
                pass
        self._fail(RuntimeError("the server is shutting down"), waiting_too=True)

    def _next_cycle(self) -> bool:
        """One turn of the loop; False once closed."""
        admitted = []
        if self._waiting or not self._active or self._closed:  # (read without the lock: a submit
            with self._cv:                                     # that races it notifies, seen next turn)
                while not self._closed and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closed:
                    return False
                admitted = self._take_admissible()
        try:
            self._cycle(admitted)
        except Exception as exc:  # a failed forward fails the running requests, not the server
            traceback.print_exc(file=sys.stderr)
            self._fail(exc)
        return True

    def _take_admissible(self) -> list[Ticket]:
        """(Under the lock.) Waiting requests that fit the free slots, oldest first; cancelled ones go."""
        for t in [t for t in self._waiting if t.generation.cancelled]:
            self._waiting.remove(t)
            self._finish(t, "cancelled")
        admitted, tokens = [], 0
        while self._waiting and self._waiting[0].rows <= self.max_slots - self._used:
            t = self._waiting.popleft()
            self._used += t.rows
            admitted.append(t)
            tokens += sum(len(r.prompt) for r in t.generation.rows)
            if tokens >= self.prefill_tokens:  # the rest after the next decode step: running streams
                break                          # wait one prefill at most between two tokens
        self._active.extend(admitted)
        self.stats.update(waiting=len(self._waiting), running=len(self._active))
        return admitted

    def _cycle(self, admitted: list[Ticket]) -> None:
        cancelled = [r for t in self._active if t.generation.cancelled for r in t.generation.rows
                     if r.finish is None]
        if cancelled:
            self.batch.drop(cancelled)
        if admitted:
            self.batch.admit([r for t in admitted for r in t.generation.rows])
        if cancelled or admitted:
            self._deliver()
        if self.batch.rows:
            self.batch.step()
            self._deliver()

    def _deliver(self) -> None:
        """Each active request's new text; finished ones leave (and free their slots). Events for
        readers on event loops are posted once per loop per step."""
        done, outbox = [], {}
        for t in self._active:
            g = t.generation
            step = g.take_step()
            finished = g.done
            if finished:
                g.finalize()
                done.append(t)
            if any(step) or any(step.logprobs):
                if t.loop is None:
                    t._emit(("step", step))
                else:
                    outbox.setdefault(t.loop, []).append((t, ("step", step)))
        for loop, events in outbox.items():
            _post(loop, events)
        if done:
            with self._cv:
                for t in done:
                    self._active.remove(t)
                    self._used -= t.rows
                    self._finish(t, "cancelled" if t.generation.cancelled else "completed")
                self.stats.update(running=len(self._active), waiting=len(self._waiting))

    def _finish(self, t: Ticket, outcome: str, error: BaseException | None = None) -> None:
        """(Under the lock.) Count it and tell its reader."""
        self.stats[outcome] += 1
        if outcome == "completed":
            self._durations.append(time.monotonic() - t.submitted)
        if not t.generation.completions:
            t.generation.finalize()
        t._emit(("error", error) if error is not None else ("done", None))

    def _fail(self, exc: BaseException, waiting_too: bool = False) -> None:
        with self._cv:
            failed = self._active + (list(self._waiting) if waiting_too else [])
            self._active = []
            if waiting_too:
                self._waiting.clear()
            self._used = sum(t.rows for t in self._active)
            for t in failed:
                self._finish(t, "failed", exc)
            self.stats.update(running=0, waiting=len(self._waiting))
        self.batch = SlotBatch(self.generator, self.max_slots, self.prefill_tokens)  # a clean cache
