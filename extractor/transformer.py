"""DETR's transformer (facebookresearch/detr ``models/transformer.py``) for inference.

Post-norm, 6 encoder + 6 decoder layers, with ``nn.MultiheadAttention``'s parameter names so
the official state-dict keys (``transformer.encoder.layers.0.self_attn.in_proj_weight``, ...)
load unchanged. Shapes: B images, L = h*w feature cells, Q queries, D = 256.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiheadAttention", "Transformer", "TransformerOutput"]

HIDDEN_DIM = 256


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names, batch first.

    Uses ``scaled_dot_product_attention`` unless the probabilities are asked for.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the packed q/k/v in-projection applied to ``x`` ``[B,L,D]``."""
        return F.linear(x, self.in_proj_weight[start:stop], self.in_proj_bias[start:stop])

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """query ``[B,Lq,D]``, key/value ``[B,Lk,D]``, key_padding_mask ``[B,Lk]`` (True = ignore)
        -> output ``[B,Lq,D]`` and, if asked, head-averaged probabilities ``[B,Lq,Lk]``."""
        batch, len_q, dim = query.shape
        if query is key:  # self-attention: one matmul for q and k
            q, k = self.project(query, 0, 2 * dim).chunk(2, dim=-1)
        else:
            q = self.project(query, 0, dim)
            k = self.project(key, dim, 2 * dim)
        v = self.project(value, 2 * dim, 3 * dim)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        weights = None
        if need_weights:
            scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            probs = scores.softmax(dim=-1)
            out = torch.matmul(probs.to(v.dtype), v)
            weights = probs.mean(dim=1)
        else:
            keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        out = out.transpose(1, 2).reshape(batch, len_q, dim)
        return self.out_proj(out), weights


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; positions go into queries and keys only."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """src ``[B,L,D]``, pos ``[B or 1,L,D]`` -> ``[B,L,D]``, weights ``[B,L,L]`` or None."""
        qk = src + pos
        attended, weights = self.self_attn(qk, qk, src, key_padding_mask, need_weights)
        src = self.norm1(src + attended)
        src = self.norm2(src + self.linear2(F.relu(self.linear1(src))))
        return src, weights


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention (unmasked), cross-attention, FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.multihead_attn = MultiheadAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_keys: Tensor,
                key_padding_mask: Tensor | None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """tgt ``[B,Q,D]``, query_pos ``[1,Q,D]``, memory and memory_keys (memory + pos)
        ``[B,L,D]`` -> ``[B,Q,D]``, cross-attention weights ``[B,Q,L]`` or None."""
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(qk, qk, tgt, None)[0])
        attended, weights = self.multihead_attn(tgt + query_pos, memory_keys, memory,
                                                key_padding_mask, need_weights)
        tgt = self.norm2(tgt + attended)
        tgt = self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
        return tgt, weights


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)


@dataclass
class TransformerOutput:
    """What one transformer pass computes; the intermediate tensors only when asked."""

    hs: Tensor                        # [B, Q, D] last decoder layer after the final norm
    memory: Tensor | None             # [B, L, D] last encoder layer output
    intermediate: Tensor | None       # [B, n_dec, Q, D] every decoder layer after the final norm
    enc_weights: Tensor | None        # [B, L, L]
    dec_weights: Tensor | None        # [B, Q, L]


class Transformer(nn.Module):
    """6 + 6 post-norm layers; the decoder starts from zeros and ends with a LayerNorm."""

    def __init__(self, dim: int = HIDDEN_DIM, num_heads: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, ffn_dim: int = 2048) -> None:
        super().__init__()
        self.d_model = dim
        self.encoder = Encoder(EncoderLayer(dim, num_heads, ffn_dim), num_encoder_layers)
        self.decoder = Decoder(DecoderLayer(dim, num_heads, ffn_dim), num_decoder_layers, dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None, query_pos: Tensor,
                return_attention: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """src ``[B,L,D]``, pos ``[B or 1,L,D]``, key_padding_mask ``[B,L]`` or None,
        query_pos ``[Q,D]`` -> decoder output ``[B,Q,D]`` (after the final norm),
        encoder weights ``[B,L,L]`` and decoder cross weights ``[B,Q,L]`` (None unless asked)."""
        out = self.run(src, pos, key_padding_mask, query_pos, return_attention)
        return out.hs, out.enc_weights, out.dec_weights

    def run(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None, query_pos: Tensor,
            return_attention: bool = False, return_features: bool = False) -> TransformerOutput:
        """As ``forward``; with ``return_features`` also the encoder memory and every decoder
        layer's output through the final norm (the official ``return_intermediate``)."""
        enc_layers, dec_layers = self.encoder.layers, self.decoder.layers
        memory, enc_weights = src, None
        for i, layer in enumerate(enc_layers):
            # Only the last layer pays for explicit probabilities; the rest stay on SDPA.
            memory, enc_weights = layer(memory, pos, key_padding_mask,
                                        return_attention and i == len(enc_layers) - 1)
        memory_keys = memory + pos  # shared by every decoder layer's cross-attention
        query_pos = query_pos[None]
        tgt = torch.zeros(memory.shape[0], query_pos.shape[1], memory.shape[2],
                          dtype=memory.dtype, device=memory.device)
        dec_weights, intermediate = None, []
        for i, layer in enumerate(dec_layers):
            tgt, dec_weights = layer(tgt, query_pos, memory, memory_keys, key_padding_mask,
                                     return_attention and i == len(dec_layers) - 1)
            if return_features and i < len(dec_layers) - 1:
                intermediate.append(self.decoder.norm(tgt))
        hs = self.decoder.norm(tgt)
        if not return_features:
            return TransformerOutput(hs, None, None, enc_weights, dec_weights)
        # The last entry is hs itself, so decoder_layers[:, -1] equals query_embeddings bit for bit.
        return TransformerOutput(hs, memory, torch.stack(intermediate + [hs], dim=1), enc_weights, dec_weights)
