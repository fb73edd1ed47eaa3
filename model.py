"""
BERT from scratch (SPEC §1): embeddings, post-LayerNorm encoder layers, a masked-LM head whose
logits are computed only at the masked positions. The encoder runs the token-dropping layer
schedule of dropping.py when it is given the kept positions, and the plain encoder otherwise.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dropping import DROPPED, FIRST, FULL, LAST, gather_tokens, layer_schedule, scatter_tokens


@dataclass
class BertConfig:
    vocab_size: int = 50304  # gpt2's 50257 + [PAD] [CLS] [SEP] [MASK], padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1


# The compact BERTs (Turc et al. 2019) and the two classics: (layers, hidden size, heads).
SIZES = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=2),
    "mini": dict(n_layer=4, n_embd=256, n_head=4),
    "small": dict(n_layer=4, n_embd=512, n_head=8),
    "medium": dict(n_layer=8, n_embd=512, n_head=8),
    "base": dict(n_layer=12, n_embd=768, n_head=12),
    "large": dict(n_layer=24, n_embd=1024, n_head=16),
}


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, query_idx=None, attn_mask=None):
        """
        x: (B, T, C) keys/values; queries are all T tokens, or only those at query_idx: (B, k).
        attn_mask: (B, 1, 1, T) bool, True = may attend (padding in fine-tuning). Returns (B, T or k, C).
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        if query_idx is not None:
            q = gather_tokens(q, query_idx)
        q, k, v = (t.view(B, -1, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, -1, C))


class Layer(nn.Module):
    """One post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, query_idx=None, attn_mask=None):
        """x: (B, T, C) -> (B, T, C), or (B, k, C) for the queries at query_idx: (B, k)."""
        x_q = x if query_idx is None else gather_tokens(x, query_idx)
        x = self.ln1(x_q + self.drop(self.attn(x, query_idx, attn_mask)))
        return self.ln2(x + self.drop(self.ffn(x)))


class Bert(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.max_position, cfg.n_embd)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.emb_ln = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        # masked-LM head: dense -> GELU -> LayerNorm -> decoder tied to tok_emb (+ bias)
        self.mlm_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlm_ln = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(self, input_ids, token_type_ids=None, attn_mask=None, keep_idx=None):
        """
        input_ids: (B, T). keep_idx: (B, k) kept positions -> run the token-dropping schedule.
        attn_mask: (B, T) bool, True at real tokens (fine-tuning only; pretraining rows are packed).
        Returns (h_last_in, h_out), both (B, T, C): the hidden state entering the last layer, and
        the final one. ScTD's local and global semantic constraints read their [CLS] rows.
        """
        B, T = input_ids.shape
        if T > self.cfg.max_position:
            raise ValueError(f"sequence length {T} exceeds the {self.cfg.max_position} positions of the model")
        pos = torch.arange(T, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)
        x = x + (self.type_emb.weight[0] if token_type_ids is None else self.type_emb(token_type_ids))
        x = self.drop(self.emb_ln(x))
        if attn_mask is not None:
            attn_mask = attn_mask[:, None, None, :]
        schedule = layer_schedule(self.cfg.n_layer, dropping=keep_idx is not None)
        for layer, stage in zip(self.layers, schedule):
            if stage == FIRST:  # kept tokens query all tokens; the rest wait here until the last layer
                x_all, x = x, layer(x, query_idx=keep_idx)
                continue
            if stage == LAST:
                x = scatter_tokens(x_all, keep_idx, x)
            h_last_in = x
            x = layer(x, attn_mask=attn_mask)
        return h_last_in, x

    def mlm_logits(self, h, positions):
        """h: (B, T, C), positions: (B, M) -> logits (B, M, V), only where a prediction is needed."""
        h = gather_tokens(h, positions)
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        return F.linear(h, self.tok_emb.weight, self.mlm_bias)

    def forward(self, input_ids, mlm_positions, keep_idx=None):
        """One pretraining pass. Returns (logits (B, M, V), h_last_in (B, T, C), h_out (B, T, C))."""
        h_last_in, h_out = self.encode(input_ids, keep_idx=keep_idx)
        return self.mlm_logits(h_out, mlm_positions), h_last_in, h_out

    def forward_flops(self, batch_size, seq_len, n_masked, n_kept=None):
        """
        Matmul FLOPs of one forward pass as executed (2 per multiply-add), n_masked predictions per
        row; n_kept tokens per row in the middle layers when dropping. A training step is ~3x this.
        """
        C, T, V = self.cfg.n_embd, seq_len, self.cfg.vocab_size

        def layer(n_q, n_kv):  # qkv on the layer's input, attention, output projection, FFN
            return 2 * n_kv * C * 3 * C + 4 * n_q * n_kv * C + 2 * n_q * C * C + 16 * n_q * C * C

        k = n_kept
        queries = {FULL: T, FIRST: k, DROPPED: k, LAST: T}
        keys = {FULL: T, FIRST: T, DROPPED: k, LAST: T}
        schedule = layer_schedule(self.cfg.n_layer, dropping=k is not None)
        per_row = sum(layer(queries[s], keys[s]) for s in schedule)
        head = 2 * n_masked * C * C + 2 * n_masked * C * V
        return batch_size * (per_row + head)
