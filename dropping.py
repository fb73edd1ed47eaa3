"""
Token dropping (Hou et al., ACL 2022): which layers see which tokens, and which tokens are kept.

The middle layers of the encoder process only the k = int(keep * T) most "important" tokens of
each row. A token's importance is a running average of the masked-LM loss of its vocabulary id:
ids the model still finds hard to predict are kept, easy ones are dropped. The last layer sees the
whole sequence again, so every position still gets a representation (and an MLM prediction).

Also here, the levers tried beside it (docs/which-dropping.md): random-LTD's layerwise schedule (Yao et al. 2022),
where every layer but the first and the last runs on its own random subset; a kept count that grows over training;
and a router that keeps part of its budget at random.
"""
import torch
import torch.distributed as dist
from torch import nn

# The four stages of the layer schedule (Hou et al. 2022). With L layers (0-indexed):
FULL = "full"          # [0, L/2-1): all tokens
FIRST = "first"        # L/2-1: queries = kept tokens, keys/values = all tokens
DROPPED = "dropped"    # [L/2, L-1): kept tokens attend to kept tokens only
LAST = "last"          # L-1: dropped tokens rejoin with the state they had before layer L/2-1
# random-LTD (Yao et al. 2022, §3): layers 1..L-2 each run on their own kept tokens (attending among themselves);
# the others bypass the layer unchanged and rejoin for the next one. Layers 0 and L-1 see all tokens.
LAYERWISE = "layerwise"


def layer_schedule(n_layer, dropping=True, layerwise=False):
    """The stage of each layer, e.g. L=12: 5x full, first, 5x dropped, last; layerwise: full, 10x layerwise, full."""
    if not dropping:
        return [FULL] * n_layer
    if n_layer < 2 + layerwise:
        raise ValueError(f"token dropping needs at least {2 + layerwise} layers, the model has {n_layer}; "
                         "pick a larger --size")
    if layerwise:
        return [FULL] + [LAYERWISE] * (n_layer - 2) + [FULL]
    first = n_layer // 2 - 1
    return [FULL] * first + [FIRST] + [DROPPED] * (n_layer - first - 2) + [LAST]


def noise_draws(n_layer, layerwise):
    """How many (B, T) tie-breaking draws a row needs: one per layerwise layer, else one."""
    return n_layer - 2 if layerwise else 1


def gather_tokens(x, idx):
    """x: (B, T, C), idx: (B, k) positions -> (B, k, C)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def scatter_tokens(x_all, idx, x_kept):
    """Writes the kept tokens back into the full sequence: x_all (B, T, C), idx (B, k), x_kept (B, k, C)."""
    return x_all.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x_all.size(-1)), x_kept)


def kept_count(keep, seq_len):
    """The static number of kept tokens per row (one graph for torch.compile)."""
    return int(keep * seq_len)


KEEP_STEP = 16  # a growing kept count moves in steps of 16 tokens (random-LTD grows in fixed steps too): few graphs


def scheduled_count(progress, keep, seq_len, ramp=0.0, full_end=0.0):
    """
    The kept count at a point of training, progress in [0, 1] of the budget (steps, or time under a time budget).
    ramp > 0: it grows linearly from kept_count(keep) to all seq_len tokens over the first `ramp` of the budget
    (random-LTD's schedule), rounded down to a multiple of KEEP_STEP above the start; full_end > 0: the last
    `full_end` of the budget keeps every token. Returns seq_len for a full-sequence step.
    """
    start = kept_count(keep, seq_len)
    if progress >= 1 - full_end:
        return seq_len
    if ramp <= 0:
        return start
    grown = (seq_len - start) * min(1.0, progress / ramp)
    return min(seq_len, start + int(grown // KEEP_STEP) * KEEP_STEP)


ROUTERS = ("loss", "random", "frequency")


class Router(nn.Module):
    """
    One importance score per vocabulary id; a row keeps its k highest-scoring tokens.

    kind="loss" (Hou et al.): imp[id] <- beta * imp[id] + (1 - beta) * mean MLM loss of id in the step.
    kind="frequency": imp[id] = -(times id was seen), so rare tokens are kept (an ablation in Hou et al.).
    kind="random": imp never changes, so the random tie-breaking alone decides (the other ablation).
    layerwise: a draw per layer (random-LTD); random_share: that share of the kept tokens drawn at random (select()).
    Special ids are pinned and never updated: the allow list (every special id but [PAD]) is always
    kept, [CLS] above everything else so it survives in every row whatever the ties; [PAD] always dropped.
    """

    def __init__(self, vocab_size, special_ids, pad_id, cls_id, kind="loss", beta=0.995, init=10.0, layerwise=False,
                 random_share=0.0):
        super().__init__()
        if kind not in ROUTERS:
            raise ValueError(f"--router {kind!r} is unknown; choose one of {', '.join(ROUTERS)}")
        self.kind, self.beta, self.layerwise, self.random_share = kind, beta, layerwise, random_share
        importance = torch.full((vocab_size,), 0.0 if kind == "frequency" else init)
        learned = torch.ones(vocab_size, dtype=torch.bool)
        for i in special_ids:
            importance[i], learned[i] = torch.finfo(torch.float32).max, False
        importance[cls_id] = float("inf")
        importance[pad_id], learned[pad_id] = float("-inf"), False
        self.register_buffer("importance", importance)
        self.register_buffer("learned", learned, persistent=False)
        # The step's statistics, summed over micro-batches (and ranks) before one update.
        self.register_buffer("loss_sum", torch.zeros(vocab_size), persistent=False)
        self.register_buffer("count", torch.zeros(vocab_size), persistent=False)

    @torch.no_grad()
    def select(self, input_ids, k, noise, n_random=0):
        """
        input_ids: (B, T) after masking; noise: (B, T) uniform draws that break ties at random.
        n_random: that many of the k are drawn at random among the ordinary tokens, the rest by importance (the
        top-k plus random picks TF Model Garden's routing layer offers); the allow list still comes first.
        Returns keep_idx: (B, k), the kept positions of each row in increasing order.
        """
        perm = noise.argsort(dim=1)  # a random order of the positions of each row
        score = self.importance[input_ids].gather(1, perm)
        if n_random:  # the first n_random ordinary tokens of the random order rank with the allow list
            ordinary = self.learned[input_ids].gather(1, perm)
            lucky = ordinary & (ordinary.cumsum(dim=1) <= n_random)
            score = torch.where(lucky, torch.finfo(torch.float32).max, score)
        # a stable sort of randomly permuted scores = highest importance first, ties in random order
        top = score.sort(dim=1, descending=True, stable=True).indices[:, :k]
        return perm.gather(1, top).sort(dim=1).values

    @torch.no_grad()
    def kept_positions(self, input_ids, noise, k):
        """input_ids: (B, T), noise: (B, D, T) -> the kept positions, (B, k) for Hou et al.'s schedule (the first draw),
        or (D, B, k) for random-LTD's (layerwise: a draw per layer); random_share of each k drawn at random."""
        n_random = int(self.random_share * k)
        if not self.layerwise:
            return self.select(input_ids, k, noise[:, 0], n_random)
        return torch.stack([self.select(input_ids, k, draw, n_random) for draw in noise.unbind(1)])

    @torch.no_grad()
    def observe(self, input_ids, targets, token_losses):
        """Adds a micro-batch to the step's statistics. targets, token_losses: (N,) at masked positions, -100 = ignored."""
        if self.kind == "loss":
            valid = targets >= 0
            ids = targets.clamp(min=0)
            self.loss_sum.index_add_(0, ids, torch.where(valid, token_losses.float(), 0.0))
            self.count.index_add_(0, ids, valid.float())
        elif self.kind == "frequency":
            self.count.index_add_(0, input_ids.flatten(), torch.ones(input_ids.numel(), device=input_ids.device))

    @torch.no_grad()
    def update(self):
        """Applies the step's statistics, identically on every rank, then clears them."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.loss_sum)
            dist.all_reduce(self.count)
        seen = self.learned & (self.count > 0)
        if self.kind == "loss":
            # several occurrences of an id in one step: average their losses (the reference code lets one win)
            mean_loss = self.loss_sum / self.count.clamp(min=1)
            ema = self.beta * self.importance + (1 - self.beta) * mean_loss
            self.importance.copy_(torch.where(seen, ema, self.importance))
        elif self.kind == "frequency":
            self.importance.copy_(torch.where(seen, self.importance - self.count, self.importance))
        self.reset()

    def reset(self):
        """Forgets the step's statistics (also how a skipped, non-finite step is discarded)."""
        self.loss_sum.zero_()
        self.count.zero_()

