"""The Llama model in one readable file.

Llama as in the paper: pre-norm RMSNorm, rotary position embeddings (RoPE), SwiGLU feed-forward,
grouped-query attention, no biases. Attention runs through `F.scaled_dot_product_attention`, which
picks the fused flash / memory-efficient kernels on GPU. Two options from the seed project:
`stable_embedding` (a LayerNorm after the token embedding) and `tie_embeddings` (the output
projection reuses the embedding matrix).

Layout and numerics follow `transformers.LlamaForCausalLM` (the half-split RoPE convention, float32
RMSNorm), so conversion in `hf.py` is a renaming of tensors and the logits are equal.

Packed sequences: pass `doc_ids` (B, T) and attention stays inside each document (block-diagonal
causal mask) while positions restart at 0 for every document.

Training: `forward(tokens, targets=...)` returns the next-token loss, computed in chunks of rows
(`linear_cross_entropy`) so the (B, T, vocab) logits are never stored: less memory and a little less
time than logits + `F.cross_entropy`, with the same value and gradients.

Inference: `KVCache` holds keys and values for prefill + cached decode (`start_pos`). Batches of
prompts with different lengths are left-padded: `padding_positions` and `padding_attention_mask`
build the `positions` and `attn_mask` that make each row compute exactly what it would alone.
Continuous batching (`serve/scheduler.py`) keeps one sequence per cache row ("slot"), each at its
own length: `start_pos` is then a (B,) tensor and `slot_attention_mask` hides what a row has not
written.

Files: a model directory is `openllama.json` + `model.safetensors` (`save_model` / `load_model`);
`load_model` also accepts a checkpoint step or run directory (`artifacts.resolve_model_dir`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .artifacts import CONFIG_FILE, MODEL_FILE, resolve_model_dir
from .config import ModelConfig
from .errors import UserError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the fused kernel: bitwise equal to the formula below in float32, less memory for backward
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32 (as transformers does), then scale in the input dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer `positions` of shape (B, T) (or (1, T), broadcast over the batch)
    -> each (B, 1, T, head_dim), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


class RopeTable:
    """cos/sin of positions 0..n-1, computed once per device and indexed per forward (the same
    numbers `rope_cos_sin` gives). Saves a dozen small ops a forward: a real share of a decode step."""

    def __init__(self, head_dim: int, theta: float, length: int):
        self.head_dim, self.theta, self.length = head_dim, theta, length
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, positions: torch.Tensor | None, start: int, length: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cos, sin, each (B, 1, T, head_dim) for `positions` (B, T), or (1, 1, T, head_dim)
        for positions start..start+length-1 when `positions` is None."""
        if torch.compiler.is_compiling():  # compiled code fuses the direct computation instead
            if positions is None:
                positions = torch.arange(start, start + length, device=device)[None]
            return rope_cos_sin(positions, self.head_dim, self.theta)
        end = start + length if positions is None else int(positions.max()) + 1
        cos, sin = self.tables.get(device, (None, None))
        if cos is None or end > cos.shape[0]:
            n = max(self.length, end)
            # A table first built during generation (inference mode) must still serve training
            # later (GRPO alternates them): build it as a normal tensor, outside inference mode.
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = rope_cos_sin(torch.arange(n, device=device)[None], self.head_dim, self.theta)
            cos, sin = self.tables[device] = cos[0, 0], sin[0, 0]  # (n, head_dim) each
        if positions is None:
            return cos[None, None, start:end], sin[None, None, start:end]
        return cos[positions][:, None], sin[positions][:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: restarts at 0 where `doc_ids` changes. (B, T)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx))
    start_idx = torch.cummax(start_idx, dim=1).values
    return idx - start_idx


def padding_positions(valid: torch.Tensor) -> torch.Tensor:
    """Positions for a left-padded batch: `valid` (B, S) is True on real tokens. Real tokens count
    0, 1, 2, ... from their row's first real token; padding gets 0 (its output is never used)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def padding_attention_mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean (B, 1, q_len, S) mask for the last `q_len` of S = `valid.shape[1]` positions (prefill:
    q_len = S; cached decode: q_len = 1, `valid` covering everything cached so far plus the new
    tokens): causal, and real tokens never see padding. A padding query sees itself, so no row is
    empty (an all-masked row is NaN in some attention kernels)."""
    S = valid.shape[1]
    q_idx = torch.arange(S - q_len, S, device=valid.device)[:, None]
    k_idx = torch.arange(S, device=valid.device)[None, :]
    mask = (k_idx <= q_idx) & valid[:, None, :]
    return (mask | (k_idx == q_idx))[:, None]


def slot_attention_mask(lengths: torch.Tensor, q_len: int, seen: int) -> torch.Tensor:
    """Boolean (B, 1, q_len, seen) mask for rows that each hold their own sequence in a KV cache
    (continuous batching): row b has `lengths[b]` tokens cached and appends q_len new ones at
    columns lengths[b]..; query i sees columns 0..lengths[b] + i. Columns beyond (another row's
    longer history, stale keys of a slot's previous sequence) stay hidden."""
    k_idx = torch.arange(seen, device=lengths.device)
    q_end = lengths[:, None] + torch.arange(q_len, device=lengths.device)[None, :]  # (B, q_len)
    return (k_idx[None, None, :] <= q_end[:, :, None])[:, None]


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask: token i sees token j iff j <= i and both are in the same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv_heads, max_len, head_dim) each.

    Two ways to write:
    - `start` an int: every row writes columns start..start+T-1 (one prompt, or a left-padded
      batch whose rows advance together). Attention sees columns 0..start+T-1.
    - `start` a (B,) LongTensor (continuous batching: each row is a slot holding its own sequence,
      at its own length): row b writes columns start[b]..start[b]+T-1. The forward then needs
      explicit `positions` (B, T) and an `attn_mask` (B, 1, T, S) (`slot_attention_mask`); attention
      sees columns 0..S-1 of every row and the mask hides what a row has not written.
    `rows(lo, hi)` is a view of some rows (same storage): a forward over a sub-batch (a prefill of
    newly admitted sequences) writes straight into their slots. `move_row` compacts slots.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               seen: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, T, head_dim) and return what attention sees. With per-row
        starts (a tensor), `seen` is S, the columns attention covers (the mask's last dimension)."""
        if isinstance(start, torch.Tensor):
            return self._update_rows(layer, start, k, v, seen)
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def _update_rows(self, layer: int, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: int | None):
        B, H, T, D = k.shape
        if seen is None or seen > self.max_len:
            raise ValueError(f"KV cache: per-row writes need the attended length (got {seen}, max_len {self.max_len})")
        # one scatter per tensor: row b, columns start[b] + 0..T-1 (no host sync, no Python loop over rows)
        cols = start.view(B, 1, 1, 1) + torch.arange(T, device=k.device).view(1, 1, T, 1)
        index = cols.expand(B, H, T, D)
        kc, vc = self.k[layer][:B], self.v[layer][:B]
        kc.scatter_(2, index, k)
        vc.scatter_(2, index, v)
        return kc[:, :, :seen], vc[:, :, :seen]

    def rows(self, lo: int, hi: int) -> "KVCache":
        """Rows lo..hi-1 as a cache of their own that shares this one's storage."""
        view = KVCache.__new__(KVCache)
        view.k = [t[lo:hi] for t in self.k]
        view.v = [t[lo:hi] for t in self.v]
        view.max_len = self.max_len
        return view

    def spread_rows(self, lo: int, source: torch.Tensor, length: int) -> None:
        """Rows lo..lo+len(source)-1 take the first `length` columns of rows lo + source[i]: the
        samples of one prompt share its prefill (computed once, in rows lo..lo+max(source))."""
        n = len(source)
        for t in (*self.k, *self.v):
            t[lo:lo + n, :, :length] = t[lo:lo + int(source.max()) + 1, :, :length][source]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` columns of row `src` into row `dst` (a slot leaving the batch
        is filled with the last active one, so active slots stay rows 0..B-1 and attention
        reads a plain view: cheaper than gathering scattered rows every step)."""
        for t in (*self.k, *self.v):
            t[dst, :, :length] = t[src, :, :length]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start_pos: int):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(start_pos, torch.Tensor):  # (B,) per-row starts (slots): attend to the mask's S columns
            k, v = cache.update(self.layer, start_pos, k, v, mask.shape[-1])
        elif cache is not None:
            k, v = cache.update(self.layer, start_pos, k, v)
        is_causal = mask is None and T > 1
        gqa = self.n_kv_heads != self.n_heads
        if gqa and mask is not None and q.device.type == "cuda":
            # the CUDA kernel that takes a mask (memory-efficient) has no GQA mode, and SDPA would fall
            # back to the slow math path: share the key/value heads explicitly instead
            rep = self.n_heads // self.n_kv_heads
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa,
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.ffn_hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, mask, cache, start_pos):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, mask, cache, start_pos))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `h @ weight.T` against `targets`, one chunk of rows at a time. The gradients
    are formed in the forward pass from the chunk's softmax (softmax - one_hot), so neither the
    (N, vocab) logits nor their log-softmax are ever stored: the largest buffer is one chunk's
    logits. Same matmuls as the plain path, one exp pass fewer, and a fraction of its memory."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, summed: bool, chunk: int, rows_out=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != ignore_index
        some_ignored = not bool(valid.all())
        safe_targets = targets.masked_fill(~valid, 0)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, tc, vc = h[s:s + chunk], safe_targets[s:s + chunk, None], valid[s:s + chunk]
            logits = (hc @ weight.t()).float()
            target_logit = logits.gather(1, tc)
            if not (need_h or need_w):
                row = (torch.logsumexp(logits, -1, keepdim=True) - target_logit).squeeze(1) * vc
                if rows_out is not None:
                    rows_out[s:s + chunk] = row
                loss += row.sum()
                continue
            # one pass of exp gives both the log-sum-exp and the softmax (in place of the logits)
            top = logits.amax(-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(-1, keepdim=True)
            row = (total.log() + top - target_logit).squeeze(1) * vc
            if rows_out is not None:  # the per-row losses this pass computes anyway (no gradient)
                rows_out[s:s + chunk] = row
            loss += row.sum()
            grad = probs.div_(total)
            grad.scatter_add_(1, tc, torch.full_like(total, -1.0))  # softmax - one_hot
            if some_ignored:
                grad.mul_(vc[:, None])
            grad = grad.to(h.dtype)
            if need_h:
                torch.mm(grad, weight, out=grad_h[s:s + chunk])
            if need_w and grad.dtype == torch.float32:
                grad_w.addmm_(grad.t(), hc)
            elif need_w:  # low-precision matmul, float32 accumulation across chunks
                grad_w += (grad.t() @ hc).float()
        denom = torch.ones((), device=h.device) if summed else valid.sum().clamp(min=1).float()
        ctx.save_for_backward(grad_h, grad_w, denom)
        ctx.weight_dtype = weight.dtype
        return loss / denom

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, denom = ctx.saved_tensors
        scale = grad_loss / denom
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


class _LinearCrossEntropyPerRow(torch.autograd.Function):
    """Per-row cross-entropy of `h @ weight.T` (0 on ignored rows), chunked like the fused loss.
    The incoming gradient differs per row, so the backward recomputes each chunk's softmax
    rather than keeping (N, vocab) of anything: one extra matmul per chunk, same peak memory."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk: int):
        valid = targets != ignore_index
        safe_targets = targets.masked_fill(~valid, 0)
        out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            logits = (h[s:s + chunk] @ weight.t()).float()
            nll = torch.logsumexp(logits, -1) - logits.gather(1, safe_targets[s:s + chunk, None]).squeeze(1)
            out[s:s + chunk] = nll * valid[s:s + chunk]
        ctx.save_for_backward(h, weight, safe_targets, valid)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, safe_targets, valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        scale = (grad_out.float() * valid)[:, None]
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s:s + ctx.chunk]
            grad = torch.softmax((hc @ weight.t()).float(), -1)
            grad.scatter_add_(1, safe_targets[s:s + ctx.chunk, None], torch.full_like(grad[:, :1], -1.0))
            grad = (grad * scale[s:s + ctx.chunk]).to(h.dtype)  # softmax - one_hot, times d loss_i
            if need_h:
                torch.mm(grad, weight, out=grad_h[s:s + ctx.chunk])
            if need_w:
                grad_w += (grad.t() @ hc).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


@torch.compiler.disable  # a loop of large matmuls: nothing to fuse, and unrolling it would slow compiles
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_bytes: int | None = None, row_losses: torch.Tensor | None = None) -> torch.Tensor:
    """`F.cross_entropy(h @ weight.T, targets)` without materialising the logits: h (N, d), weight
    (V, d), targets (N,). reduction "mean" (over targets != ignore_index), "sum", or "none": the
    (N,) float32 loss per row, 0 where ignored (for per-token log-probs). Under autocast
    the matmuls run in the autocast dtype and the softmax in float32. `chunk_bytes` bounds one
    chunk's float32 logits (default 64 MiB on CPU, 256 MiB on GPU: few enough chunks that each
    matmul stays large). `row_losses` (an (N,) float32 buffer, "mean"/"sum" only) receives each
    row's loss (0 where ignored) from the same pass, detached: per-row numbers (e.g. loss per data
    category) at no extra cost, where reduction="none" would recompute the softmax in backward
    (measured +16% per step on the demo's model)."""
    if chunk_bytes is None:
        chunk_bytes = 2**26 if h.device.type == "cpu" else 2**28
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if row_losses is not None and reduction == "none":
        raise ValueError("row_losses is for reduction 'mean' / 'sum'; 'none' returns the per-row losses")
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dtype), weight.to(dtype)
    else:
        w = weight
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
    if not torch.is_grad_enabled():  # evaluation: the Function would still form the gradients
        h, w = h.detach(), w.detach()
    with torch.autocast(h.device.type, enabled=False):
        if reduction == "none":
            return _LinearCrossEntropyPerRow.apply(h, w, targets, ignore_index, chunk)
        return _LinearCrossEntropy.apply(h, w, targets, ignore_index, reduction == "sum", chunk, row_losses)


INIT_BLOCK_ROWS = 256  # rows drawn from one seeded generator (~4 MB for a 4096-wide matrix)


def local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor this rank holds, the global index of its first row): a DTensor (FSDP2) gives its
    local shard and offset, a plain tensor itself and 0."""
    if not hasattr(p, "to_local"):
        return p.data, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), int(offset[0]) if offset else 0


def _seeded_normal_(local: torch.Tensor, first_row: int, seed: int, name: str, std: float) -> None:
    """Fill rows [first_row, first_row + len(local)) of the matrix `name` with its seeded normal values."""
    import hashlib

    rows = local.shape[0]
    flat = local.view(rows, -1)
    gen = torch.Generator(device="cpu")  # drawn on the CPU: the same numbers whatever the device
    for block in range(first_row // INIT_BLOCK_ROWS, (first_row + rows - 1) // INIT_BLOCK_ROWS + 1):
        key = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
        gen.manual_seed(int.from_bytes(key, "little") >> 1)
        lo = block * INIT_BLOCK_ROWS
        values = torch.randn(INIT_BLOCK_ROWS, flat.shape[1], generator=gen).mul_(std)
        a, b = max(lo, first_row), min(lo + INIT_BLOCK_ROWS, first_row + rows)
        flat[a - first_row:b - first_row].copy_(values[a - lo:b - lo])


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embedding_norm = nn.LayerNorm(cfg.dim) if cfg.stable_embedding else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.gradient_checkpointing = False
        self.rope = RopeTable(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len)
        if self.tok_embeddings.weight.device.type != "meta":  # on meta: the trainer initialises each shard
            self.init_weights(int(torch.randint(0, 2**62, (1,))))  # from the global RNG, as torch modules do

    # -- init ----------------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """The output projection is the embedding matrix again (`to_empty` gives plain tensors new
        storage module by module, which unties them)."""
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) for every matrix, residual output projections scaled by
        1/sqrt(2 * n_layers) (GPT-2) so the residual stream does not grow with depth; norms one.

        Each matrix is drawn in blocks of INIT_BLOCK_ROWS rows, each block from a generator seeded
        by (seed, parameter name, block), and every parameter fills only the rows it holds: a model
        sharded over any number of ranks (FSDP2 shards dim 0) gets exactly the values one process
        gets, and no rank ever materialises more than its shard plus one block."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():  # a tied output weight is listed once, as the embedding
            local, first_row = local_rows(p)
            if local.numel() == 0:
                continue
            if p.dim() == 2:
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
                _seeded_normal_(local, first_row, seed, name, std * scale)
            elif name.endswith("bias"):
                local.zero_()
            else:  # RMSNorm / LayerNorm weights
                local.fill_(1.0)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, start_pos: int = 0, return_hidden: bool = False,
                targets: torch.Tensor | None = None, ignore_index: int = -100,
                reduction: str = "mean", last_only: bool = False,
                row_losses: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) (or final hidden states with `return_hidden`).

        targets:   (B, T) next-token ids: returns the cross-entropy loss instead of the logits
                   (`reduction` "mean" over targets != ignore_index, "sum", or "none": (B, T)
                   per token, 0 where ignored), computed in row
                   chunks so the (B, T, vocab) logits never exist at once (see `linear_cross_entropy`).
                   `row_losses`: a (B * T,) float32 buffer that receives each token's loss (0 where
                   ignored) from the same pass, without gradient ("mean"/"sum").

        doc_ids:   (B, T) document index per token for packed sequences (no cross-document attention).
        positions: (B, T) explicit positions (e.g. left-padded generation); default start_pos + arange.
        attn_mask: explicit boolean mask (B, 1, T, S), True = may attend; overrides the default causal one.
                   S = T without a cache, start_pos + T with one (see `padding_attention_mask`).
        cache/start_pos: KV cache for incremental decoding; `tokens` are positions start_pos.. of the sequence.
        last_only: logits (or hidden states) of the last position only, (B, 1, vocab): a prefill
                   needs no others.
        """
        B, T = tokens.shape
        mask = attn_mask
        if doc_ids is not None:
            if positions is None:
                positions = positions_from_doc_ids(doc_ids)
            if mask is None:
                mask = document_causal_mask(doc_ids)
        if mask is None and cache is not None and start_pos > 0 and T > 1:
            # chunked prefill: causal within the chunk, full view of what is already cached
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=tokens.device).tril(start_pos)
        # without explicit positions: start_pos + arange, one (1, 1, T, head_dim) table for every row
        cos, sin = self.rope(positions, start_pos, T, tokens.device)

        h = self.tok_embeddings(tokens)
        if self.embedding_norm is not None:
            h = self.embedding_norm(h)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, cache, start_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, start_pos)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        if targets is not None:
            loss = linear_cross_entropy(h.flatten(0, 1), self.output.weight, targets.flatten(),
                                        ignore_index=ignore_index, reduction=reduction, row_losses=row_losses)
            return loss.view(B, -1) if reduction == "none" else loss
        return h if return_hidden else self.output(h)

    # -- accounting ----------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights counted once
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n


def use_cpu_decode_layout(model: nn.Module) -> nn.Module:
    """Store every Linear weight column-major (same shape, same values) for inference on CPU.

    Decoding one token multiplies a vector by each weight, so it is bound by streaming the weights
    from memory. On this project's CPUs (AMD Zen3, MKL/oneDNN) that product runs ~1.7x faster on
    the output projection when the weight's storage is (in, out), which is the transpose of the
    (out, in) layout nn.Linear keeps; measured: 1.5x -> 1.7x transformers' decode tokens/s at
    batch 1 (bench/generate_bench.py). Results differ from the row-major layout only in float
    rounding order (~1e-5). In place, no extra memory; tied embeddings stay tied. For inference
    models only: training keeps the default layout."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


def count_params(cfg: ModelConfig) -> int:
    """Parameters from the config alone (equal to `Llama(cfg).num_params()`)."""
    d, L, V = cfg.dim, cfg.n_layers, cfg.vocab_size
    attn = d * cfg.n_heads * cfg.head_dim * 2 + d * cfg.kv_heads * cfg.head_dim * 2
    ffn = 3 * d * cfg.ffn_hidden_dim
    per_layer = attn + ffn + 2 * d
    emb = V * d
    out = 0 if cfg.tie_embeddings else V * d
    stable = 2 * d if cfg.stable_embedding else 0
    return L * per_layer + emb + out + stable + d


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), the PaLM appendix-B formula:
    6 * (matmul parameters, including the output projection, excluding the embedding lookup)
    + 12 * n_layers * dim * seq_len for the attention scores and values."""
    T = seq_len or cfg.max_seq_len
    d, L = cfg.dim, cfg.n_layers
    matmul_params = count_params(cfg) - cfg.vocab_size * d * (0 if cfg.tie_embeddings else 1)
    # with tied embeddings the one matrix is used as the output matmul; the lookup itself is free
    matmul_params -= (2 * d if cfg.stable_embedding else 0) + d + L * 2 * d  # norms: no matmul
    return 6.0 * matmul_params + 12.0 * L * d * T


# -- our own model directory: openllama.json + model.safetensors -------------------------------


def write_model_config(cfg: ModelConfig, directory: str | Path, extra: dict | None = None) -> Path:
    """openllama.json: what marks a model directory and says what model it holds."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "openllama", "version": 1, "model": cfg.model_dump(mode="json"), **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def save_model(model: Llama, directory: str | Path, extra: dict | None = None) -> Path:
    """Write an openllama model directory (config + safetensors weights); tied weights stored once."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("output.weight", None)
    save_file(state, str(directory / MODEL_FILE))
    return write_model_config(model.cfg, directory, extra)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path: Path, tensors: Sequence[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]], metadata: dict[str, str] | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """A safetensors file written tensor by tensor: the header (names, shapes, offsets) first, then
    each tensor's bytes as it is produced, so only one tensor is ever in memory. Same bytes as
    `safetensors.torch.save_file` reads back."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, first = 0, None
    for name, shape, make in tensors:
        if first is None:  # every tensor of an export has one dtype: learn it from the first
            first = make()
            dtype = dtype or first.dtype
        size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for i, (name, shape, make) in enumerate(tensors):
            tensor, first = (first, None) if i == 0 else (make(), None)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, header says {shape} {dtype}")
            f.write(tensor.contiguous().view(torch.uint8).numpy().data)  # the tensor's own bytes, no copy
        f.flush()
        os.fsync(f.fileno())


def read_model_config(directory: Path) -> tuple[ModelConfig, dict]:
    meta_path = directory / CONFIG_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return ModelConfig.model_validate(meta["model"]), meta
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise UserError(f"{meta_path}: not a valid openllama model config ({str(exc).splitlines()[0]})") from None


class StoredWeights:
    """The tensors of a model directory, read one at a time (peak memory: one tensor): its
    model.safetensors, or, in a checkpoint of a sharded run, the DCP shards that openllama.json's
    `dcp` names (relative to the directory). Names are ours; a tied output weight is not stored."""

    def __init__(self, directory: str | Path):
        self.directory = resolve_model_dir(directory)
        self.cfg, meta = read_model_config(self.directory)
        self.dcp = (self.directory / meta["dcp"]).resolve() if meta.get("dcp") else None
        if self.dcp is not None:
            from torch.distributed.checkpoint import FileSystemReader

            entries = FileSystemReader(str(self.dcp)).read_metadata().state_dict_metadata
            self.specs = {k[len("model."):]: (tuple(v.size), v.properties.dtype) for k, v in entries.items()
                          if k.startswith("model.") and hasattr(v, "size")}
        else:
            from safetensors import safe_open

            with safe_open(str(self.directory / MODEL_FILE), framework="pt") as f:
                self.specs = {k: (tuple(f.get_slice(k).get_shape()), None) for k in f.keys()}

    def names(self) -> list[str]:
        return [k for k in self.specs if not (self.cfg.tie_embeddings and k == "output.weight")]

    def get(self, name: str) -> torch.Tensor:
        """One full tensor on the CPU. The safetensors file is opened for this tensor alone: a
        mapping kept open would leave every page read so far resident."""
        if self.dcp is None:
            from safetensors import safe_open

            with safe_open(str(self.directory / MODEL_FILE), framework="pt") as f:
                return f.get_tensor(name)
        import torch.distributed.checkpoint as dcp

        shape, dtype = self.specs[name]
        tensor = torch.empty(shape, dtype=dtype)
        dcp.load({"model": {name: tensor}}, checkpoint_id=str(self.dcp), no_dist=True)
        return tensor


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Llama:
    """Load an openllama model written by `save_model` (or a sharded run's checkpoint); `directory`
    may also be a checkpoint step or run directory (see `resolve_model_dir`)."""
    from safetensors.torch import load_file

    weights = StoredWeights(directory)
    with torch.device("meta"):
        model = Llama(weights.cfg)
    if weights.dcp is None:
        state = load_file(str(weights.directory / MODEL_FILE), device=str(device))
    else:
        state = {name: weights.get(name).to(device) for name in weights.names()}
    if weights.cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if weights.cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if dtype is not None:
        model.to(dtype)
    return model.to(device)
