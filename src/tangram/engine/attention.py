"""Attention over KV held in pool blocks, for a packed step: every sequence's tokens in one row of the batch.

Registered with transformers' `AttentionInterface` as `tangram_paged`, so the
model's own code (projections, rotary embedding, norms, MLP) runs unchanged
and calls this for the attention itself. A packed step has no padding: the
linear layers run once over all the step's tokens, prompt chunks and decodes
together. Per layer, the function stores the step's new K/V rows in the
sequences' blocks, then attends:
- decodes (one new token each) together: each sequence's blocks gathered
  once (one index per block, not per token) into [seqs, longest, ...], a key
  mask for the shorter ones and the unused tail of the last block, one copy
  into a head-major layout, and grouped-query attention as two batched
  matmuls (no repeat of K/V per query head; measured on CPU the fastest of
  SDPA, SDPA on contiguous copies, einsum and this);
- each prompt chunk alone with SDPA: causal over its own new K/V when it is
  the first chunk, else over its stored past and itself.
A paged-attention kernel (CUDA) can replace the gather behind the same call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "tangram_paged"
_UNSUPPORTED = ("attn_logit_softcapping", "alibi", "use_alibi")  # config features this attention does not do


@dataclass
class ChunkMeta:
    """One prompt chunk of a packed step: rows [begin, end) of the step, `past` tokens already stored."""

    begin: int
    end: int
    past: int
    read: torch.Tensor | None  # row offsets of its past + new tokens (None when past == 0: attend the new K/V)


@dataclass
class PackedStep:
    """Where a packed step's K/V go and what each query attends to; built by the runner once per step."""

    elements: torch.Tensor  # the KV region's elements (the whole arena, typed)
    rows: torch.Tensor  # overlapping [n, row_elems] view of `elements`: row i = elements[i : i + row_elems]
    blocks: torch.Tensor  # overlapping [n, layer_elems] view: one layer of the block at element offset i
    layer_elems: int
    kv_heads: int
    head_dim: int
    write: torch.Tensor  # [T * row_elems] element index of every new K/V element, layer 0
    decode_rows: torch.Tensor | None  # [B] step rows of the decodes (None: no decodes; all rows when `all_decode`)
    decode_blocks: torch.Tensor | None  # [B, blocks] block offsets of each decode's K/V (padding: a valid block)
    decode_bias: torch.Tensor | None  # [B, 1, 1, blocks x block_tokens] float32: 0 where attended, else -inf
    decode_lens: torch.Tensor | None  # [B] tokens each decode attends to (for sliding windows)
    chunks: list[ChunkMeta]
    all_decode: bool


def supports_packed(model) -> bool:
    """Whether `model`'s attention goes through transformers' attention interface with nothing this attention
    lacks (logit soft-capping, ALiBi); other models run through the padded cache (`kv.PagedCache`)."""
    if not getattr(model, "_supports_attention_backend", False):
        return False
    text = model.config.get_text_config()
    return not any(getattr(text, k, None) for k in _UNSUPPORTED)


def use_packed(model) -> None:
    """Route `model`'s attention (every sub-config) to `tangram_paged` (a kept skeleton often already is)."""
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                    scaling: float | None = None, dropout: float = 0.0, tangram_step: PackedStep | None = None,
                    sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Store this step's K/V of `module`'s layer and attend; query [1, Hq, T, D] -> output [1, T, Hq, D]."""
    if tangram_step is None:
        raise RuntimeError("tangram_paged attention runs only inside the Tangram engine's packed step")
    m = tangram_step
    shift = module.layer_idx * m.layer_elems
    _, hq, t, d = query.shape
    h = m.kv_heads
    new = torch.stack((key[0].transpose(0, 1), value[0].transpose(0, 1)), dim=1)  # [T, 2, H, D]
    m.elements.index_copy_(0, m.write + shift, new.reshape(-1).to(m.elements.dtype))
    scale = scaling if scaling is not None else d ** -0.5
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    if m.all_decode:
        return _decode(m, q, shift, scale, sliding_window).unsqueeze(0), None
    out = query.new_empty(t, hq, d)
    if m.decode_rows is not None:
        out[m.decode_rows] = _decode(m, q.index_select(0, m.decode_rows), shift, scale, sliding_window)
    for c in m.chunks:
        qc = query[:, :, c.begin:c.end]
        if c.read is None:
            kc, vc = key[:, :, c.begin:c.end], value[:, :, c.begin:c.end]
            mask, causal = _window_mask(c.end - c.begin, 0, sliding_window, query.device), True
        else:
            g = m.rows.index_select(0, c.read + shift).view(1, -1, 2, h, d)
            kc, vc = g[:, :, 0].transpose(1, 2), g[:, :, 1].transpose(1, 2)
            mask, causal = _chunk_mask(c.end - c.begin, c.past, sliding_window, query.device), False
        if mask is not None:
            causal = False
        o = F.scaled_dot_product_attention(qc, kc.to(qc.dtype), vc.to(qc.dtype), attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=hq != h)
        out[c.begin:c.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _decode(m: PackedStep, q: torch.Tensor, shift: int, scale: float, window: int | None) -> torch.Tensor:
    """Attention of one query token per sequence: q [B, Hq, D] -> [B, Hq, D]."""
    b, hq, d = q.shape
    h = m.kv_heads
    g = m.blocks.index_select(0, (m.decode_blocks + shift).reshape(-1)).view(b, -1, 2, h, d)  # whole blocks
    # one copy into [K|V, B, H, L, D]: each head's keys are then a plain matrix that the matmul reads transposed
    # (matmuls on the gathered layout copied K and V again; 1.4-2.6x slower for 16-32 sequences on the CPU)
    kv = torch.empty((2, b, h, g.shape[1], d), dtype=q.dtype, device=q.device)
    kv.copy_(g.permute(2, 0, 3, 1, 4))
    keys, values = kv[0].transpose(-1, -2), kv[1]  # [B, H, D, L], [B, H, L, D]
    scores = torch.matmul(q.view(b, h, hq // h, d), keys).float().mul_(scale) + m.decode_bias
    if window is not None:
        length = scores.shape[-1]
        if int(m.decode_lens.max()) > window:  # keys older than the window are masked too
            pos = torch.arange(length, device=q.device)
            old = pos < (m.decode_lens - window).unsqueeze(1)  # [B, L]; rows are left-aligned from position 0
            scores = scores.masked_fill(old[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, hq, d).to(q.dtype)


def _chunk_mask(n: int, past: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[n, past + n] bool: query i (at position past + i) sees keys 0..past + i (and no older than the window)."""
    qpos = torch.arange(n, device=device).unsqueeze(1) + past
    kpos = torch.arange(past + n, device=device).unsqueeze(0)
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def _window_mask(n: int, past: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """The mask of a first chunk: None (plain causal) unless a sliding window is shorter than the chunk."""
    if window is None or past + n <= window:
        return None
    return _chunk_mask(n, past, window, device)


AttentionInterface.register(NAME, paged_attention)
