"""
BERT from scratch (Devlin et al. 2019): embeddings, encoder layers, a masked-LM head whose logits are
computed only at the masked positions. The encoder runs the token-dropping layer schedule of dropping.py
when it is given the kept positions, and the plain encoder otherwise.

Two architecture switches, recorded in BertConfig (so in every checkpoint):
- position: "rotary" (RoFormer, Su et al. 2021; the default) or "alibi" (Press et al. 2022) act
  inside attention on each token's position in the original row, so a kept token keeps its place
  when its neighbours are dropped; "absolute" is BERT's learned position embeddings.
- norm: "post" LayerNorm after each residual (BERT); "pre" before each sublayer plus a final one.
BertConfig's defaults are the pretraining recipe's (train.py takes them from here); the paper's
BERT is position="absolute", dropout=0.1.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dropping import DROPPED, FIRST, FULL, LAST, LAYERWISE, gather_tokens, layer_schedule, scatter_tokens


@dataclass
class BertConfig:
    vocab_size: int = 50304  # gpt2's 50257 + [PAD] [CLS] [SEP] [MASK], padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.0  # BERT: 0.1; 0 learns faster when each token is seen about once (docs/recipe.md)
    position: str = "rotary"  # one of POSITIONS; BERT: absolute, which leaves the bag-of-words plateau far later
    norm: str = "post"  # one of NORMS


POSITIONS = ("absolute", "rotary", "alibi")
NORMS = ("post", "pre")


# The compact BERTs (Turc et al. 2019) and the two classics: (layers, hidden size, heads).
SIZES = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=2),
    "mini": dict(n_layer=4, n_embd=256, n_head=4),
    "small": dict(n_layer=4, n_embd=512, n_head=8),
    "medium": dict(n_layer=8, n_embd=512, n_head=8),
    "mini12": dict(n_layer=12, n_embd=256, n_head=4),  # L-12 H-256: base's layer schedule at mini's width
    "base": dict(n_layer=12, n_embd=768, n_head=12),
    "large": dict(n_layer=24, n_embd=1024, n_head=16),
}


def shape(size):
    """A --size: a name of SIZES, or L<layers>-H<hidden>-A<heads> (Turc et al.'s naming, e.g. L6-H512-A8) -> its dims."""
    if size in SIZES:
        return SIZES[size]
    m = re.fullmatch(r"L(\d+)-H(\d+)-A(\d+)", size)
    if not m or min(map(int, m.groups())) < 1 or int(m[2]) % int(m[3]):
        raise ValueError(f"--size {size} is neither one of {', '.join(SIZES)} nor L<layers>-H<hidden>-A<heads> "
                         f"with the heads dividing the hidden size (e.g. L6-H512-A8)")
    return dict(n_layer=int(m[1]), n_embd=int(m[2]), n_head=int(m[3]))


def size_name(cfg):
    """The --size of an architecture: its name in SIZES, else L<layers>-H<hidden>-A<heads>."""
    dims = dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head)
    return next((s for s, d in SIZES.items() if d == dims), f"L{cfg.n_layer}-H{cfg.n_embd}-A{cfg.n_head}")


def rotate(x, pos, inv_freq):
    """
    Rotary embedding in RoFormer's convention: each interleaved pair (x[2i], x[2i+1]) of a head turns
    by the angle pos * inv_freq[i]. x: (B, H, T, D), pos: (1 or B, T) -> (B, H, T, D).
    """
    angle = (pos[:, None, :, None].float() * inv_freq).to(x.dtype)  # (B, 1, T, D/2)
    cos, sin, even, odd = angle.cos(), angle.sin(), x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout, self.position = cfg.n_head, cfg.dropout, cfg.position
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        head_dim = cfg.n_embd // cfg.n_head
        if cfg.position == "rotary":  # RoFormer's frequencies: 10000^(-2i/D)
            self.register_buffer("inv_freq", 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim), persistent=False)
        if cfg.position == "alibi":  # ALiBi's slopes 2^(-8h/H), h = 1..H: a locality prior of a different reach per head
            self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, cfg.n_head + 1) / cfg.n_head), persistent=False)

    def forward(self, x, pos, query_idx=None, attn_mask=None):
        """
        x: (B, T, C) keys/values at positions pos: (1 or B, T) of the original row; queries are all T
        tokens, or only those at query_idx: (B, k). attn_mask: (B, 1, 1, T) bool, True = may attend
        (padding in fine-tuning). Returns (B, T or k, C).
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q_pos = pos
        if query_idx is not None:
            q, q_pos = gather_tokens(q, query_idx), pos.expand(B, -1).gather(1, query_idx)
        q, k, v = (t.view(B, -1, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.position == "rotary":
            q, k = rotate(q, q_pos, self.inv_freq), rotate(k, pos, self.inv_freq)
        elif self.position == "alibi":  # -slope * distance, as an additive mask; padding becomes -inf
            distance = (q_pos[:, None, :, None] - pos[:, None, None, :]).abs()
            bias = -self.slopes[:, None, None] * distance.to(q.dtype)
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, -1, C))


class Layer(nn.Module):
    """
    One encoder layer. post-LN (BERT): x = LN(x + Attn(x)); x = LN(x + FFN(x)).
    pre-LN: x = x + Attn(LN(x)); x = x + FFN(LN(x)).
    """

    def __init__(self, cfg):
        super().__init__()
        self.pre_ln = cfg.norm == "pre"
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, query_idx=None, attn_mask=None):
        """x: (B, T, C) at positions pos -> (B, T, C), or (B, k, C) for the queries at query_idx: (B, k)."""
        x_q = x if query_idx is None else gather_tokens(x, query_idx)
        if self.pre_ln:
            x = x_q + self.drop(self.attn(self.ln1(x), pos, query_idx, attn_mask))
            return x + self.drop(self.ffn(self.ln2(x)))
        x = self.ln1(x_q + self.drop(self.attn(x, pos, query_idx, attn_mask)))
        return self.ln2(x + self.drop(self.ffn(x)))


class Bert(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.position not in POSITIONS or cfg.norm not in NORMS:
            raise ValueError(f"position {cfg.position!r} / norm {cfg.norm!r}: choose from {POSITIONS} / {NORMS}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.max_position, cfg.n_embd) if cfg.position == "absolute" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.emb_ln = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        # pre-LN's residual stream is not normalized: one LayerNorm ends the encoder
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-12) if cfg.norm == "pre" else nn.Identity()
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
        input_ids: (B, T). keep_idx: (B, k) kept positions -> run Hou et al.'s token-dropping schedule;
        (L-2, B, k): each middle layer's own kept positions -> random-LTD's layerwise schedule.
        attn_mask: (B, T) bool, True at real tokens (fine-tuning only; pretraining rows are packed).
        Returns (h_last_in, h_out), both (B, T, C): the hidden state entering the last layer, and
        the final one. ScTD's local and global semantic constraints read their [CLS] rows; under
        pre-LN both pass through the final LayerNorm, so that the two compare like with like.
        """
        B, T = input_ids.shape
        if T > self.cfg.max_position:
            raise ValueError(f"sequence length {T} exceeds the {self.cfg.max_position} positions of the model")
        pos = all_pos = torch.arange(T, device=input_ids.device)[None]  # (1, T): a position per token of x
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x = x + (self.type_emb.weight[0] if token_type_ids is None else self.type_emb(token_type_ids))
        x = self.drop(self.emb_ln(x))
        if attn_mask is not None:
            attn_mask = attn_mask[:, None, None, :]
        layerwise = keep_idx is not None and keep_idx.dim() == 3
        schedule = layer_schedule(self.cfg.n_layer, dropping=keep_idx is not None, layerwise=layerwise)
        for i, (layer, stage) in enumerate(zip(self.layers, schedule)):
            if stage == FIRST:  # kept tokens query all tokens; the rest wait here until the last layer
                x_all, x = x, layer(x, all_pos, query_idx=keep_idx)
                pos = keep_idx  # the kept tokens keep their original positions
                continue
            if stage == LAST:
                x, pos = scatter_tokens(x_all, keep_idx, x), all_pos
            if stage == LAYERWISE:  # this layer's kept tokens run it at their own positions; the rest bypass it
                idx = keep_idx[i - 1]
                x = scatter_tokens(x, idx, layer(gather_tokens(x, idx), idx))
            else:
                h_last_in = x
                x = layer(x, pos, attn_mask=attn_mask)
        return self.ln_f(h_last_in), self.ln_f(x)

    def mlm_logits(self, h, positions):
        """h: (B, T, C), positions: (B, M) -> logits (B, M, V), only where a prediction is needed."""
        h = gather_tokens(h, positions)
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        return F.linear(h, self.tok_emb.weight, self.mlm_bias)

    def forward(self, input_ids, mlm_positions, keep_idx=None):
        """One pretraining pass. Returns (logits (B, M, V), h_last_in (B, T, C), h_out (B, T, C))."""
        h_last_in, h_out = self.encode(input_ids, keep_idx=keep_idx)
        return self.mlm_logits(h_out, mlm_positions), h_last_in, h_out

    def forward_flops(self, batch_size, seq_len, n_masked, n_kept=None, layerwise=False):
        """
        Matmul FLOPs of one forward pass as executed (2 per multiply-add), n_masked predictions per
        row; n_kept tokens per row in the middle layers when dropping (in layers 1..L-2 if layerwise).
        A training step is ~3x this.
        """
        C, T, V = self.cfg.n_embd, seq_len, self.cfg.vocab_size

        def layer(n_q, n_kv):  # qkv on the layer's input, attention, output projection, FFN
            return 2 * n_kv * C * 3 * C + 4 * n_q * n_kv * C + 2 * n_q * C * C + 16 * n_q * C * C

        k = n_kept
        queries = {FULL: T, FIRST: k, DROPPED: k, LAST: T, LAYERWISE: k}
        keys = {FULL: T, FIRST: T, DROPPED: k, LAST: T, LAYERWISE: k}
        schedule = layer_schedule(self.cfg.n_layer, dropping=k is not None, layerwise=layerwise)
        per_row = sum(layer(queries[s], keys[s]) for s in schedule)
        head = 2 * n_masked * C * C + 2 * n_masked * C * V
        return batch_size * (per_row + head)


def adamw(params, weight_decay, **kwargs):
    """AdamW with no weight decay on LayerNorm weights and biases (the 1-d parameters): pretraining's and fine-tuning's.
    Fused: the whole update in one kernel, on the CPU too."""
    params = list(params)
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, fused=params[0].device.type in ("cpu", "cuda"), **kwargs)


# --- Hugging Face transformers interop: the same function in the transformers class that has it ---

# (norm, position) -> the transformers class that computes what our Bert computes; the others have none.
TRANSFORMERS_CLASSES = {("post", "absolute"): "BertForMaskedLM", ("post", "rotary"): "RoFormerForMaskedLM",
                        ("pre", "absolute"): "RobertaPreLayerNormForMaskedLM"}


def _transformers_names(cfg, cls_name):
    """
    Our state_dict names -> the transformers names of the same weights (qkv is their query, key and
    value stacked). Tied weights (the decoder = the token embeddings, its bias = the MLM bias) and
    RoFormer's fixed sinusoid table are left to transformers.
    """
    pre = cfg.norm == "pre"  # only RobertaPreLayerNorm: its own names for the head and the LayerNorms
    base = {"BertForMaskedLM": "bert", "RoFormerForMaskedLM": "roformer",
            "RobertaPreLayerNormForMaskedLM": "roberta_prelayernorm"}[cls_name]
    emb, head = f"{base}.embeddings", "lm_head" if pre else "cls.predictions"
    modules = {"tok_emb": [f"{emb}.word_embeddings"], "type_emb": [f"{emb}.token_type_embeddings"],
               "emb_ln": [f"{emb}.LayerNorm"], "mlm_dense": [f"{head}.dense" if pre else f"{head}.transform.dense"],
               "mlm_ln": [f"{head}.layer_norm" if pre else f"{head}.transform.LayerNorm"]}
    if cfg.position == "absolute":
        modules["pos_emb"] = [f"{emb}.position_embeddings"]
    if pre:
        modules["ln_f"] = [f"{base}.LayerNorm"]
    ln1, ln2 = ("attention.LayerNorm", "intermediate.LayerNorm") if pre else ("attention.output.LayerNorm", "output.LayerNorm")
    for i in range(cfg.n_layer):
        layer = f"{base}.encoder.layer.{i}"
        modules |= {f"layers.{i}.attn.qkv": [f"{layer}.attention.self.{n}" for n in ("query", "key", "value")],
                    f"layers.{i}.attn.proj": [f"{layer}.attention.output.dense"],
                    f"layers.{i}.ln1": [f"{layer}.{ln1}"], f"layers.{i}.ln2": [f"{layer}.{ln2}"],
                    f"layers.{i}.ffn.0": [f"{layer}.intermediate.dense"], f"layers.{i}.ffn.2": [f"{layer}.output.dense"]}
    params = {"mlm_bias": [f"{head}.bias"]}
    for ours, theirs in modules.items():
        for p in ("weight",) if ours.endswith("_emb") else ("weight", "bias"):
            params[f"{ours}.{p}"] = [f"{n}.{p}" for n in theirs]
    return params


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("this needs the transformers package: pip install transformers") from None
    return transformers


def to_transformers(model, pad_token_id):
    """Our Bert -> the transformers model that computes the same logits (TRANSFORMERS_CLASSES), or ValueError."""
    cfg = model.cfg
    cls_name = TRANSFORMERS_CLASSES.get((cfg.norm, cfg.position))
    if cls_name is None:
        raise ValueError(f"--position {cfg.position} with --norm {cfg.norm} has no transformers class that computes "
                         f"the same function (exportable: {', '.join(f'{p}/{n}' for n, p in TRANSFORMERS_CLASSES)})")
    t = _transformers()
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
              num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.n_embd, hidden_act="gelu",
              hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
              max_position_embeddings=cfg.max_position, type_vocab_size=cfg.type_vocab_size,
              layer_norm_eps=1e-12, pad_token_id=pad_token_id)
    if cls_name == "RobertaPreLayerNormForMaskedLM":
        kw["pad_token_id"] = -1  # RoBERTa numbers positions from pad_token_id + 1: -1 makes them ours, 0..T-1
    config = getattr(t, cls_name.replace("ForMaskedLM", "Config"))(**kw)
    hf = getattr(t, cls_name)(config).eval()
    ours = model.state_dict()
    theirs = {n: w for name, names in _transformers_names(cfg, cls_name).items()
              for n, w in zip(names, ours[name].chunk(len(names)))}
    hf.load_state_dict(theirs, strict=False)
    return hf


def from_transformers(hf):
    """
    A transformers model of a class in TRANSFORMERS_CLASSES, or the folder it was saved in -> our Bert
    with the same weights, or ValueError naming what differs.
    """
    if isinstance(hf, str):
        auto = _transformers().AutoModelForMaskedLM
        try:
            hf = auto.from_pretrained(hf)
        except (OSError, ValueError) as e:
            raise ValueError(f"{hf} does not load as a transformers masked LM ({str(e).splitlines()[0][:120]})") from None
    cls_name, c = type(hf).__name__, hf.config
    variants = {name: variant for variant, name in TRANSFORMERS_CLASSES.items()}
    if cls_name not in variants:
        raise ValueError(f"cannot import {cls_name}: model.Bert computes what {', '.join(variants)} compute, no other class")
    norm, position = variants[cls_name]
    want = dict(hidden_act="gelu", intermediate_size=4 * c.hidden_size, layer_norm_eps=1e-12, is_decoder=False,
                position_embedding_type="absolute", embedding_size=c.hidden_size, rotary_value=False,
                pad_token_id=-1 if cls_name == "RobertaPreLayerNormForMaskedLM" else c.pad_token_id)
    differ = [f"{k}={getattr(c, k)!r} (ours: {v!r})" for k, v in want.items() if getattr(c, k, v) != v]
    decoder = hf.get_output_embeddings().weight
    if decoder is not hf.get_input_embeddings().weight and not torch.equal(decoder, hf.get_input_embeddings().weight):
        differ.append("an output layer not tied to the token embeddings")
    if differ:
        raise ValueError(f"cannot import this {cls_name}: {', '.join(differ)}")
    cfg = BertConfig(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                     n_embd=c.hidden_size, max_position=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
                     dropout=c.hidden_dropout_prob, position=position, norm=norm)
    model = Bert(cfg)
    theirs = hf.state_dict()
    model.load_state_dict({name: torch.cat([theirs[n] for n in names])
                           for name, names in _transformers_names(cfg, cls_name).items()})
    return model
