"""
The pretraining losses: masked LM, and ScTD's semantic-consistency constraints (Zhong et al. 2023, §3).

Where we differ from the authors' fairseq code (on purpose, following the paper's equation):
- their KL terms are summed over the batch and the whole loss is then divided by the number of
  tokens, so their effective lambda is far smaller than the 0.05 they report; ours is a batch mean.
- their "full-pass" MLM term is computed from the dropped pass's output by mistake; ours reads the
  full pass.
"""
import torch.nn.functional as F

IGNORE = -100  # target of a prediction slot that has no masked token behind it


def mlm_loss(logits, targets):
    """
    logits: (B, M, V) at the masked positions, targets: (B, M) original ids (IGNORE = none).
    Returns (mean loss, per-token losses (B*M,)); the router learns from the per-token losses.
    """
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE, reduction="none")
    n = (targets != IGNORE).sum().clamp(min=1)
    return token_losses.sum() / n, token_losses


def cls_kl(h_full, h_drop):
    """KL(softmax(h_full[:, 0]) || softmax(h_drop[:, 0])) over the hidden dim, batch mean. h: (B, T, C)."""
    log_p = F.log_softmax(h_full[:, 0].float(), dim=-1)
    log_q = F.log_softmax(h_drop[:, 0].float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def sctd_loss(mlm_drop, mlm_full, full, drop, lam):
    """
    L = 0.5 * MLM_drop + 0.5 * MLM_full + lambda * (KL_local + KL_global).
    full, drop: (h_last_in, h_out) of the two passes; local = [CLS] entering the last layer,
    global = [CLS] leaving it. Returns (loss, kl_local, kl_global).
    """
    kl_local = cls_kl(full[0], drop[0])
    kl_global = cls_kl(full[1], drop[1])
    return 0.5 * mlm_drop + 0.5 * mlm_full + lam * (kl_local + kl_global), kl_local, kl_global


def semantic_drift(full, drop):
    """The semantic drift diagnostic (Zhong et al. 2023): KL and cosine similarity of [CLS] between the passes, at both places."""
    out = {}
    for name, h_full, h_drop in (("local", full[0], drop[0]), ("global", full[1], drop[1])):
        out[f"kl_{name}"] = cls_kl(h_full, h_drop).item()
        out[f"cos_{name}"] = F.cosine_similarity(h_full[:, 0].float(), h_drop[:, 0].float(), dim=-1).mean().item()
    return out
