"""The sequential recommender: a SASRec-style causal transformer, all of it in one file.

Input: a user's recent behaviour, LEFT-padded with 0 so the latest event sits at position L-1.
Every token is item embedding + item-attribute embedding (mean over the item's attributes,
e.g. brand and category) + event-type embedding (view/click/cart/purchase) + a position
embedding counted from the END of the sequence (so extra left padding changes nothing).
Causal self-attention blocks turn it into one hidden state per position; the state at a
position scores the next item by a dot product with the (same, tied) item representations.
Training: full-softmax cross-entropy over the catalogue at every non-pad position.

References: Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018);
Klenitskiy & Vasilev, "Turning Dross Into Gold Loss" (RecSys 2023) for the full-softmax loss;
Karpathy's nanoGPT for the tone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

N_EVENT_TYPES = 5  # 0 = padding, 1..4 = view, click, cart, purchase (rerank.data.dataset.EVENT_CODE)


@dataclass
class SASRecConfig:
    n_items: int  # catalogue size: item idx 1..n_items are scored, 0 is padding
    item_capacity: int = 0  # embedding rows (>= n_items+1); the spare rows are for items added online. 0 = n_items+1
    n_attributes: int = 0  # attribute ids 1..n_attributes (0 = none); 0 disables attribute embeddings
    max_attributes: int = 0  # attribute slots per item in the `item_attributes` buffer
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ff_mult: int = 4  # feed-forward width = ff_mult * d_model
    max_len: int = 50  # the model reads the last max_len events
    dropout: float = 0.5  # on embeddings, attention output and feed-forward output
    attn_dropout: float = 0.5  # on attention weights
    use_event_types: bool = True
    position: str = "end"  # "end": embedding of the distance from the last event, added to the input;
    # "relative": a learned per-head attention bias for the distance between query and key (no
    # input position embedding), so every position is trained exactly as the last one is used
    item_bias: bool = False  # a learned per-item bias added to the logits

    def __post_init__(self) -> None:
        if self.item_capacity <= 0:
            self.item_capacity = self.n_items + 1
        if self.item_capacity < self.n_items + 1:
            raise ValueError(f"item_capacity {self.item_capacity} < n_items+1 = {self.n_items + 1}")
        if self.position not in ("end", "relative"):
            raise ValueError(f"position must be 'end' or 'relative', got {self.position!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SASRecConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown SASRecConfig fields: {sorted(unknown)}")
        return cls(**data)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape  # mask: (B, 1, L, L) bool, True = may attend
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, Dh)
        y = y.transpose(1, 2).reshape(B, L, D)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.ff_mult * config.d_model)
        self.proj = nn.Linear(config.ff_mult * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.ff(self.ln_2(x))


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        C, D = config.item_capacity, config.d_model
        self.item_emb = nn.Embedding(C, D, padding_idx=0)
        if config.position == "relative":
            self.pos_emb = None
            self.rel_bias = nn.Parameter(torch.zeros(config.n_heads, config.max_len))  # (H, distance)
        else:
            self.pos_emb = nn.Embedding(config.max_len, D)  # index = distance from the last position
            self.rel_bias = None
        self.type_emb = nn.Embedding(N_EVENT_TYPES, D, padding_idx=0) if config.use_event_types else None
        if config.n_attributes > 0:
            self.attr_emb = nn.Embedding(config.n_attributes + 1, D, padding_idx=0)
            width = max(config.max_attributes, 1)
            self.register_buffer("item_attributes", torch.zeros(C, width, dtype=torch.long))  # (C, A), 0 = none
        else:
            self.attr_emb = None
        self.item_bias = nn.Parameter(torch.zeros(C)) if config.item_bias else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(D)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.item_emb.weight[config.n_items + 1 :].zero_()  # spare rows: a new item starts from its attributes
            if self.attr_emb is not None:
                self.attr_emb.weight[0].zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def n_items(self) -> int:
        return self.config.n_items

    # ---- item representations -------------------------------------------------------------

    def set_item_attributes(self, attributes: torch.Tensor, start: int = 0) -> None:
        """Copy attribute ids (N, A') into rows start..start+N of the `item_attributes` buffer."""
        if self.attr_emb is None:
            return
        A = self.item_attributes.shape[1]
        attributes = torch.as_tensor(attributes, dtype=torch.long)[:, :A]
        attributes = attributes.clamp(min=0).masked_fill(attributes > self.config.n_attributes, 0)
        rows = self.item_attributes[start : start + attributes.shape[0]]
        rows.zero_()
        rows[:, : attributes.shape[1]] = attributes.to(rows.device)

    def item_table(self) -> torch.Tensor:
        """(item_capacity, D) item representations: embedding + mean of the item's attribute embeddings."""
        x = self.item_emb.weight  # (C, D)
        if self.attr_emb is not None:  # mean over the item's attribute ids, 0 = none (an item with none adds 0)
            x = x + F.embedding_bag(self.item_attributes, self.attr_emb.weight, mode="mean", padding_idx=0)
        return x

    @torch.no_grad()
    def frozen_item_table(self) -> torch.Tensor:
        """item_table() for inference, recomputed only when its inputs change (serving scores many
        batches with the same weights). Keyed by the tensors' in-place version counters and storage,
        so an optimizer step, grow_items or a weight load invalidates it."""
        inputs = [self.item_emb.weight] + ([self.attr_emb.weight, self.item_attributes] if self.attr_emb is not None else [])
        key = tuple((t._version, t.data_ptr(), tuple(t.shape)) for t in inputs)
        cached = getattr(self, "_frozen_table", None)
        if cached is None or cached[0] != key:
            cached = (key, self.item_table().detach())
            self._frozen_table = cached
        return cached[1]

    # ---- the transformer ---------------------------------------------------------------------

    def forward(self, seq: torch.Tensor, types: torch.Tensor | None = None,
                table: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, L, D) for left-padded item ids `seq` (B, L) and event types (B, L).

        `table` is `item_table()` when the caller has it already.
        """
        B, L = seq.shape
        if L > self.config.max_len:
            seq = seq[:, -self.config.max_len :]
            types = types[:, -self.config.max_len :] if types is not None else None
            L = self.config.max_len
        real = seq > 0  # (B, L)
        table = self.item_table() if table is None else table  # (C, D)
        x = F.embedding(seq, table)  # (B, L, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(L - 1, -1, -1, device=seq.device))  # distance from the end
        if self.type_emb is not None and types is not None:
            x = x + self.type_emb(types.masked_fill(~real, 0))
        x = self.emb_dropout(x * real.unsqueeze(-1))
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()  # (L, L)
        eye = torch.eye(L, dtype=torch.bool, device=seq.device)
        # a real position attends to earlier real positions; a pad position only to itself (no NaN rows)
        mask = (causal & real[:, None, :]) | eye  # (B, L, L)
        mask = mask.unsqueeze(1)  # (B, 1, L, L)
        if self.rel_bias is not None:  # float mask: bias by query-key distance, -inf where not allowed
            idx = torch.arange(L, device=seq.device)
            dist = (idx[:, None] - idx[None, :]).clamp(0, self.config.max_len - 1)  # (L, L)
            mask = self.rel_bias[:, dist].unsqueeze(0).masked_fill(~mask, float("-inf"))  # (B, H, L, L)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)  # (B, L, D)

    def logits(self, hidden: torch.Tensor, table: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (N, n_items+1) of all items, or (N, C) of `items` (N, C), for hidden states (N, D)."""
        if items is None:
            out = hidden @ table[: self.n_items + 1].T  # (N, n_items+1)
            if self.item_bias is not None:
                out = out + self.item_bias[: self.n_items + 1]
            return out
        w = F.embedding(items, table)  # (N, C, D)
        out = torch.einsum("nd,ncd->nc", hidden, w)
        if self.item_bias is not None:
            out = out + self.item_bias[items]
        return out

    def loss(self, seq: torch.Tensor, types: torch.Tensor | None, targets: torch.Tensor,
             label_smoothing: float = 0.0, bf16_logits: bool = False) -> torch.Tensor:
        """Full-softmax cross-entropy of the next item at every non-pad position. targets (B, L), 0 = none.

        `bf16_logits` computes the (N, n_items) logits and their softmax in bfloat16: the logits
        dominate the cost (memory traffic), and halving their size made a CPU step ~1.6x faster.
        """
        table = self.item_table()  # (C, D)
        hidden = self(seq, types, table)  # (B, L, D)
        keep = targets > 0  # (B, L)
        h, w = hidden[keep], table[1 : self.n_items + 1]  # (N, D), (n_items, D): column j scores item j+1
        if bf16_logits:
            h, w = h.bfloat16(), w.bfloat16()
        logits = h @ w.T  # (N, n_items)
        if self.item_bias is not None:
            logits = logits + self.item_bias[1 : self.n_items + 1].to(logits.dtype)
        return F.cross_entropy(logits, targets[keep] - 1, label_smoothing=label_smoothing)

    # ---- serving API -------------------------------------------------------------------------

    @torch.no_grad()
    def score_all(self, seq: torch.Tensor, types: torch.Tensor | None = None,
                  table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_items+1) next-item scores from the last position; column 0 is -inf."""
        table = self.item_table() if table is None else table
        hidden = self(seq, types, table)[:, -1]  # (B, D)
        out = self.logits(hidden, table).float()
        out[:, 0] = float("-inf")
        return out

    @torch.no_grad()
    def score_candidates(self, seq: torch.Tensor, types: torch.Tensor | None, candidates: torch.Tensor,
                         table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) scores of candidate item ids (B, C). Candidate 0 (unknown) gets the lowest finite score.

        `table` is `item_table()` when the caller has it already (it only changes with the weights).
        """
        table = self.item_table() if table is None else table
        hidden = self(seq, types, table)[:, -1]  # (B, D)
        cands = candidates.clamp(min=0).masked_fill(candidates > self.n_items, 0)
        out = self.logits(hidden, table, cands).float()  # (B, C)
        unknown = cands == 0
        if unknown.any():
            known = out.masked_fill(unknown, math.inf)
            floor = known.min(dim=1, keepdim=True).values
            floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor)) - 1.0
            out = torch.where(unknown, floor.expand_as(out), out)
        return out

    # ---- online growth -----------------------------------------------------------------------

    def grow_items(self, new_n_items: int, attributes: torch.Tensor | None = None) -> None:
        """Start scoring items n_items+1..new_n_items (rows reserved by item_capacity).

        `attributes` (new_n_items - n_items, A) gives their attribute ids, so a new item starts
        from its attribute embedding (cold start) rather than from nothing.
        """
        old = self.n_items
        if new_n_items < old:
            raise ValueError(f"cannot shrink the catalogue from {old} to {new_n_items} items")
        if new_n_items + 1 > self.config.item_capacity:
            raise ValueError(f"{new_n_items} items exceed item_capacity {self.config.item_capacity} (rows incl. padding)")
        if attributes is not None:
            attributes = torch.as_tensor(attributes)
            if attributes.shape[0] != new_n_items - old:
                raise ValueError(f"attributes has {attributes.shape[0]} rows, expected {new_n_items - old}")
            self.set_item_attributes(attributes, start=old + 1)
        self.config.n_items = new_n_items
