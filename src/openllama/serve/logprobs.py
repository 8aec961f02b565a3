"""Log-probabilities in OpenAI's two shapes: chat (`logprobs.content`: token, logprob, bytes,
top_logprobs) and legacy completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

A token's text is its piece with SentencePiece's word marker as a space (" Hello"); a byte-fallback
token (`<0xE4>`, part of a character) has its one byte in `bytes` and U+FFFD as text; a special
token (`<unk>`, a role marker) shows its name but has no bytes (it is not part of the reply's
text). So joining the `bytes` of a reply's tokens gives its exact UTF-8. Log-probabilities are of the model's own
distribution (see `generate.SamplingParams`); -inf is sent as -9999.0, as OpenAI does (JSON has no
infinity).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from ..generate import TokenLogprob

_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class LogprobFormat:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._special = set(getattr(tokenizer, "special_tokens", ()))

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token."""
        if token_id not in self._cache:
            piece = self.tokenizer.id_to_token(token_id) or ""
            byte = _BYTE.fullmatch(piece)
            if piece in self._special:
                self._cache[token_id] = (piece, [])
                return self._cache[token_id]
            raw = bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token_id]

    def chat(self, entries: Sequence[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        return {"content": [self._chat_entry(e) for e in entries], "refusal": None}

    def _chat_entry(self, e: TokenLogprob) -> dict:
        text, raw = self.token(e.token)
        top = []
        for tid, lp in e.top:
            t, b = self.token(tid)
            top.append({"token": t, "logprob": _finite(lp), "bytes": b})
        return {"token": text, "logprob": _finite(e.logprob), "bytes": raw, "top_logprobs": top}

    def completion(self, entries: Sequence[TokenLogprob] | None, offset: int = 0, top: bool = True) -> dict | None:
        """Legacy shape; `offset`: characters of the choice's text before these tokens."""
        if entries is None:
            return None
        tokens, offsets = [], []
        for e in entries:
            text = self.token(e.token)[0]
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        tops = [{self.token(tid)[0]: _finite(lp) for tid, lp in e.top} for e in entries] if top else None
        return {"tokens": tokens, "token_logprobs": [_finite(e.logprob) for e in entries], "top_logprobs": tops,
                "text_offset": offsets}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0
