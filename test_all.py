"""
The method, as tests. CPU, offline, tiny sizes: `python -m pytest -q test_all.py`.
They read only the repository's own fixtures (testdata/: a Wikipedia sample, a few rows of each GLUE/SuperGLUE
format, the gpt2 BPE files).
"""
import json
import lzma
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "testdata")
CORPUS = os.path.join(TESTDATA, "enwiki_small.jsonl.xz")

import bench  # noqa: E402
import data  # noqa: E402
import finetune  # noqa: E402
import train  # noqa: E402
from dropping import FIRST, LAST, LAYERWISE, Router, layer_schedule, scheduled_count  # noqa: E402
from loss import cls_kl, mlm_loss, sctd_loss  # noqa: E402
from model import (NORMS, POSITIONS, SIZES, Bert, BertConfig, SelfAttention, adamw, from_transformers,  # noqa: E402
                   rotate, to_transformers)

VARIANTS = [(p, n) for p in POSITIONS for n in NORMS]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The small Wikipedia corpus, prepared once for the whole session."""
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    data.prepare(CORPUS, cache_dir=cache_dir)
    return cache_dir


def tiny_model(n_layer=2, dropout=0.0, seed=0, position="absolute", norm="post"):
    torch.manual_seed(seed)
    return Bert(BertConfig(**dict(SIZES["tiny"], n_layer=n_layer), dropout=dropout, position=position, norm=norm)).eval()


def real_batch(cache, batch_size=4, seq_len=64, seed=0, mask_rate=data.MASK_PROB):
    tokens = data.load_tokens(data.cache_folder(CORPUS, None, cache, None), "train")
    return data.Batches(tokens, seq_len, seed, torch.device("cpu"), mask_rate).get(torch.arange(batch_size).numpy())


def run_train(out_dir, cache, *args):
    """train.py in this process; returns the log as a list of dicts."""
    argv = ["--size", "tiny", "--data", CORPUS, "--cache_dir", cache, "--out_dir", str(out_dir), "--seq_len", "32",
            "--batch_size", "4", "--log_every", "1", "--eval_iters", "2", "--lr", "1e-3", *map(str, args)]
    train.main(argv)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(*args, env=None):
    """An entry point as a user runs it: (exit code, stderr)."""
    p = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    return p.returncode, p.stderr


def one_line_error(err, *words):
    """A user error: no traceback, and a last line 'error: ...' naming what to fix (progress bars may precede)."""
    last = err.strip().splitlines()[-1]
    return "Traceback" not in err and last.startswith("error:") and all(w in last for w in words)


# ------------------------------------------------------------------------------------------------
# model.py: the encoder, its MLM head and position schemes

@pytest.mark.parametrize("position,norm", VARIANTS)
def test_shapes(position, norm):
    model = tiny_model(position=position, norm=norm)
    ids = torch.randint(0, 50000, (3, 16))
    positions = torch.tensor([[1, 5, 7]] * 3)
    logits, h_last_in, h_out = model(ids, positions)
    assert logits.shape == (3, 3, data.GPT2.size)
    assert h_last_in.shape == h_out.shape == (3, 16, 128)
    assert data.GPT2.size % 64 == 0 and data.GPT2.size > data.GPT2.mask


def test_sparse_mlm_logits_equal_dense(cache):
    model = tiny_model()
    b = real_batch(cache)
    _, h_out = model.encode(b.input_ids)
    dense = model.mlm_logits(h_out, torch.arange(h_out.size(1)).expand(h_out.size(0), -1))
    sparse = model.mlm_logits(h_out, b.mlm_positions)
    expected = dense.gather(1, b.mlm_positions[..., None].expand(-1, -1, dense.size(-1)))
    assert torch.allclose(sparse, expected, atol=1e-5)


def test_mlm_head_is_tied_to_token_embedding():
    model = tiny_model()
    h, positions = torch.randn(1, 4, 128), torch.tensor([[0, 1]])
    with torch.no_grad():
        before = model.mlm_logits(h, positions)
        model.tok_emb.weight[7] += 1.0  # moves the input embedding of id 7 ...
        after = model.mlm_logits(h, positions)
    changed = (after - before).abs().amax(dim=(0, 1)) > 0
    assert changed.nonzero().flatten().tolist() == [7]  # ... and the output logit of id 7, only


def test_rotary_turns_each_pair_as_a_complex_number():
    """RoFormer's convention: pair i of a head, read as x[2i] + j x[2i+1], is multiplied by exp(j pos theta_i)."""
    x, pos, inv_freq = torch.randn(2, 3, 5, 8), torch.randint(0, 500, (2, 5)), 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    pairs = torch.view_as_complex(x.double().reshape(2, 3, 5, 4, 2).contiguous())
    turned = pairs * torch.polar(torch.ones(()).double(), pos[:, None, :, None].double() * inv_freq.double())
    assert torch.allclose(rotate(x, pos, inv_freq), torch.view_as_real(turned).flatten(-2).float(), atol=1e-4)


@pytest.mark.parametrize("position", ["rotary", "alibi"])
def test_kept_tokens_attend_at_their_original_positions(position):
    """
    Attention over the kept tokens alone (positions 3, 40, 90) equals attention in the whole row with
    every other key masked out: a kept token at 40 next to one at 90 is 50 apart, not 1.
    """
    torch.manual_seed(0)
    attn = SelfAttention(BertConfig(n_embd=64, n_head=4, dropout=0.0, position=position)).eval()
    kept = torch.tensor([[3, 40, 90]])
    x_all = torch.randn(1, 100, 64)
    only_kept = torch.zeros(1, 1, 1, 100, dtype=torch.bool)
    only_kept[..., kept[0]] = True
    with torch.no_grad():
        in_row = attn(x_all, torch.arange(100)[None], attn_mask=only_kept)[:, kept[0]]
        alone = attn(x_all[:, kept[0]], kept)
        packed = attn(x_all[:, kept[0]], torch.arange(3)[None])  # what forgetting the positions would give
        queries = attn(x_all, torch.arange(100)[None], query_idx=kept, attn_mask=only_kept)  # the first dropping layer
    assert (alone - in_row).abs().max() < 1e-5 and (queries - in_row).abs().max() < 1e-5
    assert (packed - in_row).abs().max() > 1e-3


@pytest.mark.parametrize("norm", NORMS)
def test_sctd_reads_states_through_the_same_final_layernorm(cache, norm):
    """Under pre-LN the residual stream is unnormalized: h_last_in and h_out both pass the final LayerNorm."""
    model = tiny_model(n_layer=4, norm=norm, position="rotary")
    if norm == "pre":
        with torch.no_grad():
            model.ln_f.weight.mul_(3.0)  # not the identity, so that a missing LayerNorm shows
    b, seen = real_batch(cache), {}
    model.layers[-1].register_forward_pre_hook(lambda m, a: seen.__setitem__("last_in", a[0]))
    model.layers[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    router = Router(data.GPT2.size, data.GPT2.special, data.GPT2.pad, data.GPT2.cls)
    for keep_idx in (None, router.select(b.input_ids, 32, b.noise[:, 0])):
        with torch.no_grad():
            _, h_last_in, h_out = model(b.input_ids, b.mlm_positions, keep_idx)
        assert torch.allclose(h_last_in, model.ln_f(seen["last_in"])) and torch.allclose(h_out, model.ln_f(seen["out"]))
    assert isinstance(model.ln_f, torch.nn.LayerNorm) == (norm == "pre")


def test_drop_path_compiles_and_matches_eager(cache):
    model = tiny_model(n_layer=4)
    b = real_batch(cache)
    router = Router(data.GPT2.size, data.GPT2.special, data.GPT2.pad, data.GPT2.cls)
    keep_idx = router.select(b.input_ids, 32, b.noise[:, 0])
    compiled = torch.compile(model)
    with torch.no_grad():
        eager = model(b.input_ids, b.mlm_positions, keep_idx)
        fast = compiled(b.input_ids, b.mlm_positions, keep_idx)
    for a, c in zip(eager, fast):
        assert (a - c).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------
# dropping.py: the layer schedule and the router

def test_layer_schedule():
    assert layer_schedule(12) == ["full"] * 5 + ["first"] + ["dropped"] * 5 + ["last"]
    assert layer_schedule(24).index("first") == 11 and layer_schedule(24).count("dropped") == 11
    assert layer_schedule(2) == ["first", "last"]
    with pytest.raises(ValueError, match="at least 2 layers"):
        layer_schedule(1)
    # random-LTD: every layer but the first and the last on its own kept tokens
    assert layer_schedule(12, layerwise=True) == ["full"] + ["layerwise"] * 10 + ["full"]
    with pytest.raises(ValueError, match="at least 3 layers"):
        layer_schedule(2, layerwise=True)


def test_keep_schedule_hand_computed():
    # T=128, keep 0.25: 32 kept, growing to 128 over the first half of the budget in steps of 16 tokens (0.1: 32 + 19.2)
    assert [scheduled_count(p, 0.25, 128, ramp=0.5) for p in (0, 0.1, 0.25, 0.4, 0.5, 0.9)] == [32, 48, 80, 96, 128, 128]
    # fixed keep, then the last 10% of the budget on the full sequence
    assert [scheduled_count(p, 0.5, 128, full_end=0.1) for p in (0, 0.5, 0.89, 0.9, 1.0)] == [64, 64, 64, 128, 128]


@pytest.mark.parametrize("position,norm", VARIANTS)
def test_keep_all_equals_full_path(cache, position, norm):
    model = tiny_model(n_layer=4, position=position, norm=norm)
    b = real_batch(cache)
    T = b.input_ids.size(1)
    keep_idx = torch.arange(T).expand(b.input_ids.size(0), -1)
    with torch.no_grad():
        full = model(b.input_ids, b.mlm_positions)
        drop = model(b.input_ids, b.mlm_positions, keep_idx)
    for a, c in zip(full, drop):
        assert (a - c).abs().max() < 1e-5


@pytest.mark.parametrize("position", POSITIONS)
def test_layerwise_keeping_all_equals_full_path(cache, position):
    model = tiny_model(n_layer=4, position=position)
    b = real_batch(cache)
    B, T = b.input_ids.shape
    every_layer = torch.arange(T).expand(2, B, -1)  # (L-2, B, T): layers 1 and 2 keep everything
    with torch.no_grad():
        for a, c in zip(model(b.input_ids, b.mlm_positions), model(b.input_ids, b.mlm_positions, every_layer)):
            assert (a - c).abs().max() < 1e-5


def test_layerwise_flops_hand_computed():
    # a layer on n tokens of width C: 24 n C^2 (qkv, output, FFN) + 4 n^2 C (attention); C = 128, layers 1 and 2 of 4
    # on 16 of 32 tokens: 2 x ((24 * 32 * 128^2 + 4 * 32^2 * 128) - (24 * 16 * 128^2 + 4 * 16^2 * 128)) fewer
    model = tiny_model(n_layer=4)
    assert model.forward_flops(1, 32, 4) - model.forward_flops(1, 32, 4, 16, layerwise=True) == 2 * (13_107_200 - 6_422_528)


def test_layerwise_bypassed_tokens_skip_only_their_layer(cache):
    """Layer 1 keeps the first half of each row, layer 2 the second: a token bypasses one middle layer, runs the other."""
    model = tiny_model(n_layer=4)
    b = real_batch(cache)
    B, T = b.input_ids.shape
    seen = {}
    for i in range(4):
        model.layers[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out)))
    halves = torch.arange(T).view(2, 1, T // 2).expand(2, B, -1)
    with torch.no_grad():
        _, h_last_in, _ = model(b.input_ids, b.mlm_positions, halves)
    first, second = slice(0, T // 2), slice(T // 2, T)
    assert seen[1][0].shape == seen[2][0].shape == (B, T // 2, 128)  # the middle layers ran on their half only
    # after layer 0: the second half bypasses layer 1 and enters layer 2 unchanged; the first half bypasses layer 2
    assert torch.equal(seen[2][0], seen[0][1][:, second])
    assert torch.equal(h_last_in[:, first], seen[1][1])
    assert torch.equal(h_last_in[:, second], seen[2][1])


def test_layerwise_draws_a_subset_per_layer_and_keeps_the_specials(cache):
    b = real_batch(cache, seq_len=64)
    b = data.Batches(data.load_tokens(data.cache_folder(CORPUS, None, cache, None), "train"), 64, 0,
                     torch.device("cpu"), noise_draws=4).get(np.arange(4))
    assert b.noise.shape == (4, 4, 64)
    assert torch.equal(b.noise[:, 0], real_batch(cache, seq_len=64).noise[:, 0])  # the first draw: as without layerwise
    router = Router(data.GPT2.size, data.GPT2.special, data.GPT2.pad, data.GPT2.cls, kind="random", layerwise=True)
    keep_idx = router.kept_positions(b.input_ids, b.noise, 32)
    assert keep_idx.shape == (4, 4, 32)
    kept = [set(layer[0].tolist()) for layer in keep_idx]
    assert len({frozenset(k) for k in kept}) == 4  # four layers, four subsets
    special = {i for i, t in enumerate(b.input_ids[0].tolist()) if t in data.GPT2.special}
    assert special and all(special <= k for k in kept)


def test_random_share_keeps_the_specials_and_part_of_the_budget_at_random():
    router = Router(data.GPT2.size, data.GPT2.special, data.GPT2.pad, data.GPT2.cls)
    router.importance[100:108] = torch.arange(8.0)  # id 107 the most important
    ids = torch.tensor([[data.GPT2.cls] + list(range(100, 108)) + [data.GPT2.sep]])
    draws = [torch.rand(1, 10, generator=torch.Generator().manual_seed(s)) for s in range(50)]
    assert {tuple(router.select(ids, 5, n)[0].tolist()) for n in draws} == {(0, 6, 7, 8, 9)}  # top-3 by importance
    picks = [set(router.select(ids, 5, n, n_random=2)[0].tolist()) for n in draws]
    assert all(len(p) == 5 and {0, 9, 8} <= p for p in picks)  # specials, and 107: random or the top of the rest
    assert set.union(*picks) == set(range(10))  # every token is kept sometimes


def test_dropped_tokens_rejoin_unchanged(cache):
    model = tiny_model(n_layer=6)
    b = real_batch(cache)
    first, last = layer_schedule(6).index(FIRST), layer_schedule(6).index(LAST)
    seen = {}
    model.layers[first].register_forward_pre_hook(lambda m, a: seen.__setitem__("first_in", a[0]))
    model.layers[last].register_forward_pre_hook(lambda m, a: seen.__setitem__("last_in", a[0]))
    router = Router(data.GPT2.size, data.GPT2.special, data.GPT2.pad, data.GPT2.cls)
    keep_idx = router.select(b.input_ids, 32, b.noise[:, 0])
    with torch.no_grad():
        model(b.input_ids, b.mlm_positions, keep_idx)
    dropped = torch.ones_like(b.input_ids, dtype=torch.bool).scatter(1, keep_idx, False)
    assert dropped.sum() == b.input_ids.numel() - keep_idx.numel()
    assert torch.equal(seen["last_in"][dropped], seen["first_in"][dropped])
    assert not torch.allclose(seen["last_in"][~dropped], seen["first_in"][~dropped])


def test_router_keeps_specials_and_drops_pad_first():
    router = Router(data.GPT2.size, data.GPT2.special, data.GPT2.pad, data.GPT2.cls)
    router.importance[100:110] = torch.arange(10.0)  # id 109 most important
    ids = torch.tensor([[data.GPT2.cls, 100, data.GPT2.mask, 109, 105, data.GPT2.pad, data.GPT2.sep, 101, data.GPT2.pad, 108]])
    keep = router.select(ids, 6, torch.rand(1, 10))
    assert keep.tolist() == [[0, 2, 3, 4, 6, 9]]  # specials, then 109 > 108 > 105; no [PAD]
    # with more pinned tokens than room, [CLS] still survives and [PAD] goes before everything else
    ids = torch.tensor([[data.GPT2.mask] * 4 + [data.GPT2.cls] + [data.GPT2.pad] * 3])
    for seed in range(20):
        keep = router.select(ids, 3, torch.rand(1, 8, generator=torch.Generator().manual_seed(seed)))
        assert 4 in keep.tolist()[0] and max(keep.tolist()[0]) <= 4
        assert keep.tolist()[0] == sorted(keep.tolist()[0])


def test_router_breaks_ties_at_random():
    router = Router(data.GPT2.size, data.GPT2.special, data.GPT2.pad, data.GPT2.cls)
    ids = torch.tensor([[data.GPT2.cls] + [7] * 15])
    picks = {tuple(router.select(ids, 4, torch.rand(1, 16)).tolist()[0]) for _ in range(20)}
    assert len(picks) > 5 and all(p[0] == 0 for p in picks)


def test_importance_update_hand_computed():
    router = Router(data.GPT2.size, data.GPT2.special, data.GPT2.pad, data.GPT2.cls, beta=0.9)
    # id 5 occurs twice (losses 2 and 4 -> mean 3), id 9 once (loss 1), one ignored slot
    router.observe(None, torch.tensor([5, 9, 5, -100]), torch.tensor([2.0, 1.0, 4.0, 50.0]))
    router.update()
    assert router.importance[5].item() == pytest.approx(0.9 * 10 + 0.1 * 3)
    assert router.importance[9].item() == pytest.approx(0.9 * 10 + 0.1 * 1)
    assert router.importance[6].item() == 10.0  # unseen ids keep their value
    router.observe(None, torch.tensor([5]), torch.tensor([0.0]))
    router.update()
    assert router.importance[5].item() == pytest.approx(0.9 * (0.9 * 10 + 0.1 * 3))
    assert router.importance[data.GPT2.mask] > 1e30 and router.importance[data.GPT2.pad] == float("-inf")


def test_frequency_router_keeps_rare_tokens():
    router = Router(data.GPT2.size, data.GPT2.special, data.GPT2.pad, data.GPT2.cls, kind="frequency")
    router.observe(torch.tensor([[3, 3, 3, 4]]), None, None)
    router.update()
    keep = router.select(torch.tensor([[data.GPT2.cls, 3, 4, 5]]), 3, torch.rand(1, 4))
    assert keep.tolist() == [[0, 2, 3]]


# ------------------------------------------------------------------------------------------------
# loss.py: masked LM and ScTD's semantic constraints

def test_kl_zero_for_identical_passes_positive_otherwise():
    h = torch.randn(4, 8, 16)
    assert cls_kl(h, h).item() == pytest.approx(0.0, abs=1e-7)
    assert cls_kl(h, torch.randn(4, 8, 16)).item() > 0
    loss, kl_local, kl_global = sctd_loss(torch.tensor(2.0), torch.tensor(4.0), (h, h), (h, h), 0.05)
    assert loss.item() == pytest.approx(3.0) and kl_local.item() == pytest.approx(0.0, abs=1e-7)
    other = torch.randn(4, 8, 16)
    loss, kl_local, kl_global = sctd_loss(torch.tensor(2.0), torch.tensor(4.0), (h, h), (other, other), 0.05)
    assert loss.item() == pytest.approx(3.0 + 0.05 * (kl_local + kl_global).item())
    p, q = torch.softmax(h[:, 0], -1), torch.softmax(other[:, 0], -1)
    assert kl_local.item() == pytest.approx((p * (p.log() - q.log())).sum(-1).mean().item(), rel=1e-5)


def test_mlm_loss_ignores_unfilled_slots():
    logits = torch.randn(1, 3, 10)
    loss, per_token = mlm_loss(logits, torch.tensor([[1, 2, -100]]))
    assert per_token[2] == 0
    assert loss.item() == pytest.approx(per_token[:2].mean().item())


# ------------------------------------------------------------------------------------------------
# data.py: preparation, packing, dynamic masking

def test_packing_cls_first_sep_last(cache):
    b = real_batch(cache, batch_size=8, seq_len=40)
    assert b.input_ids.shape == (8, 40)
    assert (b.input_ids[:, 0] == data.GPT2.cls).all() and (b.input_ids[:, -1] == data.GPT2.sep).all()
    assert not (b.input_ids == data.GPT2.pad).any()  # packed rows: no padding in pretraining


@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_masking_statistics(cache, rate):
    b = real_batch(cache, batch_size=512, seq_len=128, mask_rate=rate)
    targets, positions = b.mlm_targets, b.mlm_positions
    original = b.input_ids.clone().scatter_(1, positions, targets.clamp(min=0))
    special = original >= data.GPT2.eod
    valid = targets >= 0
    assert not special.gather(1, positions)[valid].any()  # a special token is never masked
    assert abs(valid.sum().item() / (~special).sum().item() - rate) < 0.01
    now, was = b.input_ids.gather(1, positions)[valid], targets[valid]
    to_mask = (now == data.GPT2.mask).float().mean().item()
    unchanged = (now == was).float().mean().item()
    assert abs(to_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02 and abs(1 - to_mask - unchanged - 0.1) < 0.02
    assert (b.input_ids[:, 0] == data.GPT2.cls).all() and (b.input_ids[:, -1] == data.GPT2.sep).all()


def test_masking_is_per_example_not_per_batch(cache):
    """Example 5 is masked the same way in a batch of 8 and in a batch of 2 (what makes DDP exact)."""
    batches = data.Batches(data.load_tokens(data.cache_folder(CORPUS, None, cache, None), "train"), 32, 3,
                           torch.device("cpu"))
    big = batches.get(torch.arange(8).numpy())
    small = batches.get(torch.arange(4, 6).numpy())
    assert torch.equal(big.input_ids[5], small.input_ids[1]) and torch.equal(big.noise[5], small.noise[1])
    assert not torch.equal(big.input_ids[4], big.input_ids[5])


def test_shuffle_order_moves_words_and_their_masks_together(cache):
    b = real_batch(cache, batch_size=6, seq_len=48)
    s = data.shuffle_order(b, seed=1)
    assert (s.input_ids[:, 0] == data.GPT2.cls).all() and (s.input_ids[:, -1] == data.GPT2.sep).all()
    assert torch.equal(s.input_ids.sort(dim=1).values, b.input_ids.sort(dim=1).values)  # the same words per row
    assert not torch.equal(s.input_ids, b.input_ids)
    assert (s.mlm_positions.diff(dim=1) > 0).all()  # still increasing, as Batch promises
    # each target is still paired with the token now standing in for it (a [MASK], a random or the same id)
    pairs = lambda x: sorted(zip(x.input_ids.gather(1, x.mlm_positions).flatten().tolist(), x.mlm_targets.flatten().tolist()))
    assert pairs(s) == pairs(b)


def test_order_gap_is_zero_only_without_positions(cache):
    """Without position embeddings attention cannot see word order: the shuffled rows score the same."""
    b, model = real_batch(cache, batch_size=4, seq_len=48), tiny_model()
    loss = lambda x: mlm_loss(model(x.input_ids, x.mlm_positions)[0], x.mlm_targets)[0].item()
    with torch.no_grad():
        assert abs(loss(data.shuffle_order(b, 0)) - loss(b)) > 1e-4
        model.pos_emb.weight.zero_()
        assert abs(loss(data.shuffle_order(b, 0)) - loss(b)) < 1e-5


def test_odd_text_is_counted_not_fatal(tmp_path):
    corpus = tmp_path / "odd.txt"
    docs = [b"First document, plain.", b"Bad bytes \xff\xfe here and \xc3 there.", b"Third " * 400]
    corpus.write_bytes(b"\n\n\n".join(docs) + b"\n")
    folder = data.prepare(str(corpus), cache_dir=str(tmp_path / "cache"))
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["invalid_utf8_bytes"] == 3 and meta["documents"] == 3
    assert meta["val_tokens"] == len(data.get_encoding().encode_ordinary(docs[0].decode() + "\n")) + 1  # 1st doc + EOT
    jsonl = tmp_path / "odd.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "", "  ", "two " * 5000, "three"]))
    folder = data.prepare(str(jsonl), cache_dir=str(tmp_path / "cache"), max_tokens=100)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["empty_documents"] == 2 and meta["train_tokens"] == 100  # a document longer than the budget: cut


def test_interrupted_preparation_leaves_no_cache(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"document number {i}" for i in range(300)))
    chunks = data._chunks
    monkeypatch.setattr(data, "_chunks", lambda docs: (c if i == 0 else 1 / 0 for i, c in enumerate(chunks(docs, 100))))
    with pytest.raises(ZeroDivisionError):
        data.prepare(str(corpus), cache_dir=str(tmp_path / "cache"))
    folder = data.cache_folder(str(corpus), None, str(tmp_path / "cache"), None)
    assert not os.path.exists(folder)  # only folder.tmp, which the next run replaces
    monkeypatch.setattr(data, "_chunks", chunks)
    assert json.load(open(os.path.join(data.prepare(str(corpus), cache_dir=str(tmp_path / "cache")), "meta.json")))["documents"] == 300


def test_two_runs_preparing_the_same_source_side_by_side(tmp_path):
    """The second waits for the first and reuses its folder (they once wrote into one temporary folder and broke it)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"document number {i} " * 50 for i in range(2000)))
    code = f"import data; print(data.prepare({str(corpus)!r}, cache_dir={str(tmp_path / 'cache')!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folder = outs[0][0].strip().splitlines()[-1]
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert outs[1][0].strip().splitlines()[-1] == folder and meta["documents"] == 2000
    assert os.path.getsize(os.path.join(folder, "train.bin")) == 2 * meta["train_tokens"]


def test_truncated_token_file_and_tiny_corpus_are_refused(cache, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(["a few words"] * 3 + ["more words here " * 10]))
    code, err = run_cli(*train_cmd(tmp_path / "o", str(tmp_path / "cache"), "--data", small, "--steps", 2))
    assert code != 0 and one_line_error(err, "--batch_size"), err
    folder = data.prepare(CORPUS, cache_dir=str(tmp_path / "cache2"))
    with open(os.path.join(folder, "train.bin"), "r+b") as f:
        f.truncate(1000)  # as if killed mid-write
    code, err = run_cli(*train_cmd(tmp_path / "o", str(tmp_path / "cache2"), "--steps", 2))
    assert code != 0 and one_line_error(err, "truncated", folder), err


# ------------------------------------------------------------------------------------------------
# train.py: the training step, runs, resume, the time budget

def test_adamw_decays_matrices_not_layernorm_weights_or_biases():
    model = tiny_model()
    decay, no_decay = adamw(model.parameters(), 0.1, lr=1e-3).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    layernorm_or_bias = {n for n in names.values() if "ln" in n or n.endswith("bias")}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert {names[id(p)] for p in no_decay["params"]} == layernorm_or_bias
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - layernorm_or_bias


def test_sctd_full_pass_exactly_every_interval(cache, tmp_path, monkeypatch):
    steps, full_passes = [], []
    forward, step_fn = Bert.forward, train.train_step

    def counting_forward(self, input_ids, mlm_positions, keep_idx=None):
        if self.training and keep_idx is None:
            full_passes.append(steps[-1])
        return forward(self, input_ids, mlm_positions, keep_idx)

    def recording_step(model, router, opt, scaler, batches, cfg, step, lr, k, autocast):
        steps.append(step)
        return step_fn(model, router, opt, scaler, batches, cfg, step, lr, k, autocast)

    monkeypatch.setattr(Bert, "forward", counting_forward)
    monkeypatch.setattr(train, "train_step", recording_step)
    log = run_train(tmp_path, cache, "--mode", "sctd", "--steps", 20, "--eval_every", 100)
    assert steps == list(range(20)) and full_passes == [0, 10]
    assert [r["step"] for r in log if r["mode"] == "sctd"] == [0, 10]
    assert all("kl_local" in r for r in log if r["mode"] == "sctd")
    assert all(r["mode"] == "drop" for r in log if r["step"] not in (0, 10))


def test_tiny_model_learns(cache, tmp_path, capsys):
    log = run_train(tmp_path, cache, "--steps", 60, "--eval_every", 20, "--batch_size", 8)
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert val[0] > val[1] > val[2] and val[-1] < 9.5, val  # from ln(50304) = 10.8 at the start
    assert all(r["tokens_per_s"] > 0 for r in log)
    capsys.readouterr()
    train.main(["--size", "tiny", "--data", CORPUS, "--cache_dir", cache, "--out_dir", str(tmp_path), "--seq_len", "32",
                "--batch_size", "8", "--eval_iters", "2", "--eval_only"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps_done"] == 60 and abs(printed["val_loss"] - val[-1]) < 1e-5  # the final evaluation, reproduced
    assert sum(1 for _ in open(tmp_path / "log.jsonl")) == len(log)  # and nothing written
    run = bench.read_run(str(tmp_path))  # config.json beside log.jsonl: all bench.py --runs needs
    assert run["config"]["size"] == "tiny" and run["evals"][-1]["val_loss"] == val[-1]
    assert run["config"]["data_config"] is None  # a local file: no hub configuration was used


@pytest.mark.parametrize("mode", ["full", "sctd"])
def test_resume_continues_the_same_curve(cache, tmp_path, mode):
    args = ["--mode", mode, "--steps", 12, "--save_every", 6, "--eval_every", 100, "--dropout", 0.1,
            "--sctd_interval", 4]
    whole = run_train(tmp_path / "a", cache, *args)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt_prev.pt", tmp_path / "b" / "ckpt.pt")  # the step-6 checkpoint
    resumed = run_train(tmp_path / "b", cache, *args, "--resume")
    assert [r["step"] for r in resumed] == list(range(6, 12))
    for a, b in zip(whole[6:], resumed):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5
    ta = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    tb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert torch.equal(ta["router"]["importance"], tb["router"]["importance"])  # the router table survives
    if mode == "sctd":
        assert (ta["router"]["importance"][:50000] != 10.0).sum() > 10  # and it was learned


def test_time_budget_ends_the_run_and_decays_the_lr_over_it(cache, tmp_path, monkeypatch):
    ticks = iter(range(10**6))  # a fake clock that moves 0.5 s at each reading: every step takes 0.5 s
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: 0.5 * next(ticks)))
    args = ["--time_budget", 0.1, "--warmup", 2, "--eval_every", 100, "--save_every", 4]
    log = run_train(tmp_path / "a", cache, *args)  # 6 s of budget: 12 steps
    assert [r["step"] for r in log] == list(range(12)) and "val_loss" in log[-1]
    assert [r["train_time"] for r in log] == [0.5 * (s + 1) for s in range(12)]
    assert [r["tokens"] for r in log] == [(s + 1) * 4 * 32 for s in range(12)]
    # warm-up over 2 steps, then linear in the time trained: 1 s (the end of warm-up) -> lr, 6 s -> 0
    expected = [5e-4, 1e-3] + [1e-3 * (6 - 0.5 * s) / (6 - 1) for s in range(2, 12)]
    assert [r["lr"] for r in log] == pytest.approx(expected)
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["clock"] == dict(train_time=6.0, warmup_end=1.0, kinds=dict(full=12))
    (tmp_path / "b").mkdir()  # resumed from step 8, the clock goes on from 4 s: the same lr to the end
    shutil.copy(tmp_path / "a" / "ckpt_prev.pt", tmp_path / "b" / "ckpt.pt")
    resumed = run_train(tmp_path / "b", cache, *args, "--resume")
    assert [r["step"] for r in resumed] == list(range(8, 12))
    assert [r["lr"] for r in resumed] == pytest.approx(expected[8:])
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in log[8:]], abs=1e-5)


def step_times_file(path, **ms):
    """A bench.py --json file with the given milliseconds per step kind, at run_train's shape with --seq_len 64 --size mini."""
    rows = [dict(size="mini", seq_len=64, batch_size=4, kind=kind.replace("_", " ").replace("k ", "k="), ms_per_step=t)
            for kind, t in ms.items()]
    path.write_text(json.dumps(dict(rows=rows)))
    return str(path)


def test_keep_schedule_on_the_modelled_clock_and_its_resume(cache, tmp_path):
    times = step_times_file(tmp_path / "steps.json", full=4000, drop_k_16_layerwise=1000, drop_k_32_layerwise=2000,
                            drop_k_48_layerwise=3000)
    args = ["--size", "mini", "--seq_len", 64, "--mode", "drop", "--router", "random", "--layerwise", "--keep", 0.25,
            "--keep_ramp", 1.0, "--full_end", 0.2, "--time_budget", 0.5, "--warmup", 2, "--step_times", times,
            "--eval_every", 100, "--save_every", 7, "--dropout", 0.1]
    log = run_train(tmp_path / "a", cache, *args)
    # 30 s of budget; 16 kept tokens, 32 from 10 s (a third of the ramp: 16 + 48/3), 48 from 20 s, all from 24 s
    kinds = ["drop k=16 layerwise"] * 10 + ["drop k=32 layerwise"] * 5 + ["drop k=48 layerwise"] * 2 + ["full"]
    assert [r["kind"] for r in log] == kinds
    assert [r["train_time"] for r in log] == list(range(1, 11)) + [12, 14, 16, 18, 20, 23, 26, 30]
    assert log[-1]["kinds"] == {"drop k=16 layerwise": 10, "drop k=32 layerwise": 5, "drop k=48 layerwise": 2, "full": 1}
    (tmp_path / "b").mkdir()  # resumed from the step-14 checkpoint, in the middle of the 32-token stage
    shutil.copy(tmp_path / "a" / "ckpt_prev.pt", tmp_path / "b" / "ckpt.pt")
    resumed = run_train(tmp_path / "b", cache, *args, "--resume")
    assert [r["kind"] for r in resumed] == kinds[14:] and resumed[-1]["kinds"] == log[-1]["kinds"]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in log[14:]], abs=1e-5)
    # the loss router with a random share of its budget trains, and its table learns
    run_train(tmp_path / "c", cache, "--seq_len", 64, "--mode", "drop", "--random_share", 0.25, "--steps", 3)
    assert (torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["router"]["importance"][:50000] != 10).any()


def test_time_budget_does_not_count_compilation(cache, tmp_path, monkeypatch):
    ticks = iter(range(10**6))  # every step takes 0.5 s on a fake clock; compiling is the identity here
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: 0.5 * next(ticks)))
    monkeypatch.setattr(train.torch, "compile", lambda module: module)
    args = ["--mode", "sctd", "--sctd_interval", 3, "--time_budget", 0.1, "--warmup", 2, "--eval_every", 100]
    log = run_train(tmp_path / "a", cache, *args, "--compile")
    # step 0 (the first ScTD step) and step 1 (the first dropping step) compile: 6 s of budget need 14 steps
    assert [r["mode"] for r in log[:4]] == ["sctd", "drop", "drop", "sctd"]
    assert [r["train_time"] for r in log] == [0.0, 0.0] + [0.5 * (s - 1) for s in range(2, 14)]
    assert run_train(tmp_path / "b", cache, *args, "--no-compile")[-1]["step"] == 11  # eager: all 12 steps count


def test_time_budget_overshot_by_the_last_step_still_saves_it(cache, tmp_path, monkeypatch):
    ticks = iter(range(10**6))  # steps of 4 s against a 6 s budget: the second one ends 2 s past it
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: 4.0 * next(ticks)))
    log = run_train(tmp_path, cache, "--time_budget", 0.1, "--warmup", 1, "--eval_every", 100, "--save_every", 100)
    assert [r["step"] for r in log] == [0, 1]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    # resumed, it has nothing left to do: no step past the budget
    log = run_train(tmp_path, cache, "--time_budget", 0.1, "--warmup", 1, "--eval_every", 100, "--save_every", 100,
                    "--resume")
    assert [r["step"] for r in log] == [0, 1]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_checkpoint_records_the_variant_and_everything_follows_it(cache, tmp_path, capsys):
    log = run_train(tmp_path, cache, "--steps", 4, "--eval_every", 4, "--position", "alibi", "--norm", "pre",
                    "--mode", "drop", "--keep", "0.75")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (ckpt["model_config"]["position"], ckpt["model_config"]["norm"]) == ("alibi", "pre")
    capsys.readouterr()
    # the flags' defaults (another variant) give way to the checkpoint's
    train.main(["--size", "tiny", "--data", CORPUS, "--cache_dir", cache, "--out_dir", str(tmp_path), "--seq_len", "32",
                "--batch_size", "4", "--eval_iters", "2", "--eval_only"])
    out = capsys.readouterr()
    assert abs(json.loads(out.out.strip().splitlines()[-1])["val_loss"] - log[-1]["val_loss"]) < 1e-5
    assert "--position alibi --norm pre" in out.err
    init = finetune.load_init(finetune.parse_args(["--task", "rte", "--ckpt", str(tmp_path / "ckpt.pt")]))
    assert (init.model_config["position"], init.model_config["norm"]) == ("alibi", "pre")
    random = finetune.load_init(finetune.parse_args(["--task", "rte", "--init", "random", "--size", "tiny"]))
    assert random.model_config["position"] == train.TrainConfig.position


def test_the_12_layer_size_trains_resumes_benches_and_exports(cache, tmp_path):
    """--size mini12 (L-12 H-256): BERT-base's layer schedule at mini's width, through every entry point."""
    args = ["--size", "mini12", "--mode", "sctd", "--sctd_interval", 2, "--steps", 4, "--save_every", 2,
            "--eval_every", 4, "--batch_size", 2]
    whole = run_train(tmp_path / "a", cache, *args)
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["size"] == "mini12" and ckpt["model_config"]["n_embd"] == 256
    assert sum(k.endswith("ffn.0.weight") for k in ckpt["model"]) == 12
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt_prev.pt", tmp_path / "b" / "ckpt.pt")  # the step-2 checkpoint
    resumed = run_train(tmp_path / "b", cache, *args[2:], "--resume")  # --size tiny given: the checkpoint's wins
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole[2:]], abs=1e-5)
    assert [r["mode"] for r in resumed] == ["sctd", "drop"]
    rows = bench.benchmark(bench.parse_args(["--sizes", "mini", "mini12", "--seq_lens", "64", "--batch_size", "2",
                                             "--steps", "2", "--warmup", "0"]))
    drop = {r["size"]: r["flops_speedup"] for r in rows if r["mode"] == "drop"}
    assert drop["mini12"] > drop["mini"] > 1  # five of twelve layers run on the kept half, one of four at mini
    pytest.importorskip("transformers")
    train.main(["--out_dir", str(tmp_path / "a"), "--export", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 12


# ------------------------------------------------------------------------------------------------
# train.py: reliability (kills, signals, damaged checkpoints, non-finite losses)

def last_per_step(log):
    """A resumed run logs some steps twice; the later line is the one that counts."""
    return {r["step"]: r for r in log}


def train_cmd(out_dir, cache, *args):
    return ["train.py", "--size", "tiny", "--data", CORPUS, "--cache_dir", cache, "--out_dir", str(out_dir),
            "--seq_len", "32", "--batch_size", "4", "--log_every", "1", "--eval_every", "1000", "--lr", "1e-3",
            *map(str, args)]


def start_and_wait(cmd, log_path, lines):
    """Starts an entry point and waits until its log has `lines` lines."""
    p = subprocess.Popen([sys.executable, *cmd], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (os.path.exists(log_path) and sum(1 for _ in open(log_path)) >= lines):
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.05)
    return p


def test_sigkill_then_resume_gives_the_uninterrupted_curve(cache, tmp_path):
    args = ["--steps", 24, "--save_every", 1]
    whole = run_train(tmp_path / "whole", cache, *args)
    p = start_and_wait(train_cmd(tmp_path / "killed", cache, *args), tmp_path / "killed" / "log.jsonl", 5)
    time.sleep(random.uniform(0, 0.3))  # anywhere in a step, checkpoint writes included
    p.send_signal(signal.SIGKILL)
    p.wait()
    resumed = run_train(tmp_path / "killed", cache, *args, "--resume")
    got = last_per_step(resumed)
    assert sorted(got) == list(range(24))
    for r in whole:
        assert abs(got[r["step"]]["loss"] - r["loss"]) < 1e-5, r["step"]


def test_sigterm_saves_and_exits_zero(cache, tmp_path):
    p = start_and_wait(train_cmd(tmp_path, cache, "--steps", 1000), tmp_path / "log.jsonl", 3)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 0
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == len(open(tmp_path / "log.jsonl").readlines()) < 1000


def test_damaged_checkpoint_is_refused_and_the_previous_kept(cache, tmp_path, capsys):
    run_train(tmp_path, cache, "--steps", 6, "--save_every", 3)
    ckpt, prev = tmp_path / "ckpt.pt", tmp_path / "ckpt_prev.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as by a full disk
    log = run_train(tmp_path, cache, "--steps", 8, "--save_every", 3, "--resume")
    assert "ckpt.pt is unreadable" in capsys.readouterr().err
    assert [r["step"] for r in log[6:]] == [3, 4, 5, 6, 7]  # resumed from the step-3 checkpoint
    assert (tmp_path / "ckpt.pt.bad").exists()  # set aside, so it never replaces a good one
    assert torch.load(ckpt, weights_only=True)["step"] == 8 and torch.load(prev, weights_only=True)["step"] == 6
    for f in (ckpt, prev):
        f.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, cache, "--steps", 8, "--resume")
    assert "--resume" in str(e.value.code) and "unreadable" in str(e.value.code)


def nan_objective(bad_calls):
    """train.objective, with a NaN loss on the given calls (0-based)."""
    calls, objective = [], train.objective

    def poisoned(*args):
        loss, stats, token_losses = objective(*args)
        calls.append(None)
        return (loss * float("nan"), stats, token_losses * float("nan")) if len(calls) - 1 in bad_calls else \
            (loss, stats, token_losses)
    return poisoned


def test_nan_loss_never_reaches_the_weights(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "objective", nan_objective({3}))
    log = run_train(tmp_path, cache, "--mode", "drop", "--steps", 8, "--save_every", 100)
    assert [r["step"] for r in log if r.get("skipped")] == [3]
    assert all(math.isfinite(r["loss"]) for r in log if r["step"] != 3)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not state["router"]["importance"].isnan().any()


def test_too_many_bad_steps_stop_the_run(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "objective", nan_objective(set(range(4, 100))))
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, cache, "--steps", 50, "--save_every", 2, "--max_bad_steps", 3)
    assert "step 6" in str(e.value.code) and str(tmp_path) in str(e.value.code)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 6  # the last good state: 4 real updates
    assert torch.load(tmp_path / "ckpt_prev.pt", weights_only=True)["step"] == 4


# ------------------------------------------------------------------------------------------------
# train.py: DDP is exactly data parallelism

DDP_DRIVER = """
import os, sys, torch
sys.path.insert(0, {here!r})
import dropping, train
update = dropping.Router.update
def update_and_dump(self):  # each rank writes its table after every update
    update(self)
    torch.save(self.importance, os.path.join({out!r}, "router_rank" + os.environ["RANK"] + ".pt"))
dropping.Router.update = update_and_dump
train.main(sys.argv[1:])
"""


# (mode, more flags): the third, random-LTD's layers on a kept count that grows to the full row at step 5
DDP_CASES = [("full", []), ("drop", []), ("sctd", []),
             ("drop", ["--size", "mini", "--layerwise", "--router", "random", "--keep_ramp", 0.5])]


@pytest.mark.parametrize("mode,more", DDP_CASES)
def test_ddp_equals_one_process_with_the_whole_batch(cache, tmp_path, mode, more):
    args = ["--mode", mode, "--steps", 10, "--dropout", 0, "--sctd_interval", 3, *more]
    (tmp_path / "ddp").mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER.format(here=HERE, out=str(tmp_path / "ddp")))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(driver), *train_cmd(tmp_path / "ddp", cache, *args)[1:]],
                       cwd=HERE, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    single = run_train(tmp_path / "one", cache, *args, "--batch_size", 8)
    ddp = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")]
    assert len(ddp) == len(single) == 10
    for a, b in zip(ddp, single):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    wa = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    wb = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert max((wa["model"][k] - wb["model"][k]).abs().max().item() for k in wa["model"]) < 1e-5
    if mode != "full":  # (full-sequence training never consults the router)
        tables = [torch.load(tmp_path / "ddp" / f"router_rank{r}.pt") for r in (0, 1)]
        assert torch.equal(tables[0], tables[1])  # bit-identical across ranks
    if more:
        assert [r["kind"] for r in single] == ["drop k=16 layerwise"] * 5 + ["full"] * 5
    if mode == "drop":  # and one process with grad_accum 2 over the same examples
        accum = run_train(tmp_path / "accum", cache, *args, "--grad_accum", 2)
        assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(accum, single))


# ------------------------------------------------------------------------------------------------
# train.py: the GPU path (torch.compile, bf16 autocast), checked on the CPU

# ltd-ramp's flags at T=512, where the kept count grows through 24 values (128, 144, ..., 496: one a step), ScTD on
# them (its full pass every 4th step), and Hou et al.'s loss router at a fixed half; a 3-layer model, the smallest in
# which random-LTD has a middle layer (inductor's compilation takes most of these tests' time)
GPU_PATH = {"ltd-ramp": ["--mode", "drop", "--router", "random", "--layerwise", "--keep", 0.25, "--keep_ramp", 1],
            "sctd-ramp": ["--mode", "sctd", "--router", "random", "--layerwise", "--keep", 0.25, "--keep_ramp", 1,
                          "--sctd_interval", 4],
            "loss-router": ["--mode", "drop"]}


def gpu_path_run(out_dir, cache, name, *args, seq_len=512, steps=24):
    return run_train(out_dir, cache, "--size", "L3-H32-A1", "--seq_len", seq_len, "--steps", steps, "--eval_every", steps,
                     *GPU_PATH[name], *args)


@pytest.mark.parametrize("name", GPU_PATH)
def test_compiled_training_gives_the_eager_losses_and_a_growing_count_compiles_once_more(cache, tmp_path, name):
    from torch._dynamo.utils import counters
    eager = gpu_path_run(tmp_path / "eager", cache, name)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # past the limit torch would run eager, silently
        compiled = gpu_path_run(tmp_path / "compiled", cache, name, "--compile")
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert [r["kind"] for r in compiled] == [r["kind"] for r in eager]
    counts = {r["kind"].split()[1] for r in eager if r["kind"] != "full"}  # "k=128", ... (ScTD's steps count too)
    assert len(counts) == (1 if name == "loss-router" else 24)
    # inductor may reorder float sums: the losses (~10.5) agree to 1e-4 over 24 steps (~1e-6 seen), not bitwise
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(eager, compiled)) < 1e-4
    assert abs(eager[-1]["val_loss"] - compiled[-1]["val_loss"]) < 1e-4
    # the dropped pass at its first count, then one graph dynamic in the count for the 23 others; ScTD's full pass
    # one more (the evaluation runs the model eager)
    assert graphs == {"ltd-ramp": 2, "sctd-ramp": 3, "loss-router": 1}[name], graphs


@pytest.mark.parametrize("name", GPU_PATH)
def test_bf16_autocast_on_the_cpu_trains_and_its_checkpoint_loads(cache, tmp_path, name, capsys):
    log = gpu_path_run(tmp_path, cache, name, "--dtype", "bf16", seq_len=128, steps=8)  # bf16 is emulated on most CPUs: slow
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["val_loss"] < log[0]["loss"]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["dtype"] == "bf16" and all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())
    capsys.readouterr()
    train.main(["--size", "L3-H32-A1", "--data", CORPUS, "--cache_dir", cache, "--out_dir", str(tmp_path), "--seq_len",
                "128", "--batch_size", "4", "--eval_iters", "2", "--dtype", "bf16", *map(str, GPU_PATH[name]), "--eval_only"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps_done"] == 8 and abs(printed["val_loss"] - log[-1]["val_loss"]) < 1e-5


# ------------------------------------------------------------------------------------------------
# model.py, data.py, train.py: transformers interop (a test requirement: pip install -r requirements-test.txt)

def corpus_texts(n):
    """The first n paragraphs of the corpus, as they stand."""
    texts = []
    with lzma.open(CORPUS, "rt") as f:
        for line in f:
            texts += [p for p in json.loads(line)["text"].split("\n") if p.strip()]
            if len(texts) >= n:
                return texts[:n]


EXPORTS = [("full", "absolute", "post", "BertForMaskedLM"), ("drop", "rotary", "post", "RoFormerForMaskedLM"),
           ("sctd", "absolute", "pre", "RobertaPreLayerNormForMaskedLM")]


def exported_logits(out_dir, folder, mask_id):
    """(ours, theirs, the transformers model): the logits at 4 masked positions of 4 corpus rows, from the checkpoint in
    out_dir and from its export in folder, each text tokenized by the exported tokenizer."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    ours = Bert(BertConfig(**ckpt["model_config"])).eval()
    ours.load_state_dict(ckpt["model"])
    batch = tok(corpus_texts(4), max_length=48, truncation=True, padding="max_length", return_tensors="pt")
    masked = torch.tensor([[3, 10, 20, 30]] * 4)
    batch["input_ids"].scatter_(1, masked, mask_id)
    with torch.no_grad():
        _, h = ours.encode(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"].bool())
        want = ours.mlm_logits(h, masked)
        got = hf(**batch).logits.gather(1, masked[..., None].expand(-1, -1, want.shape[-1]))
    return want, got, hf


@pytest.mark.parametrize("mode,position,norm,cls_name", EXPORTS)
def test_export_gives_the_same_logits_in_transformers(cache, tmp_path, mode, position, norm, cls_name):
    transformers = pytest.importorskip("transformers")
    run_train(tmp_path, cache, "--steps", 3, "--eval_every", 3, "--mode", mode, "--keep", "0.75",
              "--position", position, "--norm", norm, "--sctd_interval", 2)
    train.main(["--out_dir", str(tmp_path), "--export", str(tmp_path / "hf")])
    want, got, hf = exported_logits(tmp_path, tmp_path / "hf", data.GPT2.mask)
    assert type(hf).__name__ == cls_name
    assert (got - want).abs().max() < 1e-4 and want.std() > 0.1


def test_exported_tokenizer_gives_our_ids():
    transformers = pytest.importorskip("transformers")
    enc = data.get_encoding()
    tok = data.transformers_tokenizer()
    texts = corpus_texts(300)
    assert tok(texts)["input_ids"] == [[data.GPT2.cls] + enc.encode_ordinary(t) + [data.GPT2.sep] for t in texts]
    for max_len in (10_000, 64):  # [CLS] a [SEP] b [SEP], token types 0 then 1, truncated as finetune.py does
        pairs = tok(texts[:100], texts[100:200], max_length=max_len, truncation="longest_first")
        assert list(zip(pairs["input_ids"], pairs["token_type_ids"])) == \
            [finetune.encode_pair(enc.encode_ordinary(a), enc.encode_ordinary(b), max_len)
             for a, b in zip(texts[:100], texts[100:200])]
    assert tok("Paris is the [MASK] of France.")["input_ids"] == \
        [data.GPT2.cls, *enc.encode_ordinary("Paris is the"), data.GPT2.mask, *enc.encode_ordinary(" of France."), data.GPT2.sep]
    assert isinstance(tok, transformers.PreTrainedTokenizerBase)


def test_import_a_transformers_bert_gives_the_same_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)).eval()
    ours = from_transformers(hf).eval()
    ids, types = torch.randint(0, 1000, (2, 40)), torch.randint(0, 2, (2, 40))
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=types).logits
        _, h = ours.encode(ids, types)
        got = ours.mlm_logits(h, torch.arange(40).expand(2, -1))
    assert (got - want).abs().max() < 1e-4 and want.std() > 0.1


def test_continued_pretraining_and_finetuning_start_from_an_export(cache, tmp_path, capsys):
    pytest.importorskip("transformers")
    run_train(tmp_path / "a", cache, "--steps", 2, "--eval_every", 2, "--position", "absolute")
    train.main(["--out_dir", str(tmp_path / "a"), "--export", str(tmp_path / "hf")])
    run_train(tmp_path / "b", cache, "--steps", 1, "--eval_every", 1, "--init_from", tmp_path / "hf", "--lr", "1e-9")
    assert "following --init_from" in capsys.readouterr().err  # absolute, not the default rotary
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in "ab")
    assert max((a[k] - b[k]).abs().max() for k in a) < 1e-6  # lr 1e-9: one step moves nothing; a fresh init differs by ~0.02
    init = finetune.load_init(finetune.parse_args(["--task", "rte", "--ckpt", str(tmp_path / "hf")]))
    assert all(torch.equal(init.state[k], a[k]) for k in a)


def test_a_variant_without_a_transformers_class_is_refused():
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="no transformers class"):
        to_transformers(tiny_model(position="rotary", norm="pre"), pad_token_id=data.GPT2.pad)
    with pytest.raises(ValueError, match="no transformers class"):
        to_transformers(tiny_model(position="alibi"), pad_token_id=data.GPT2.pad)


# ------------------------------------------------------------------------------------------------
# Your own vocabulary: a Hugging Face tokenizer (testdata's WordPiece), continued pretraining of a WordPiece BERT

WORDPIECE = os.path.join(TESTDATA, "wordpiece", "tokenizer.json")
# spaces doubled, leading, trailing, alone; other whitespace; accents, CJK, special tokens inside words; a word over
# WordPiece's 100 characters; nothing
TRICKY_TEXTS = ["  a  b ", " ", "\tx\ny z", "Café naïve 東京 [MASK] x[SEP]y", "a" * 300 + " b", ""]


@pytest.fixture(scope="module")
def wordpiece():
    pytest.importorskip("transformers")
    return data.load_tokenizer(WORDPIECE)


def test_a_tokenizer_json_gives_the_roles_and_the_ids_of_its_own_library(wordpiece, tmp_path):
    from tokenizers import Tokenizer
    v = wordpiece.vocab  # a bare tokenizer.json names no roles: found by their usual tokens
    assert (v.n_ids, v.size, v.pad, v.cls, v.sep, v.mask, v.eod, v.special) == (4000, 4032, 0, 2, 3, 4, 3, (0, 1, 2, 3, 4))
    # encoded word by word (each distinct word once), as the library encodes the texts whole
    assert data.encodes_word_by_word(wordpiece.hf.backend_tokenizer)
    texts = corpus_texts(50) + TRICKY_TEXTS
    assert wordpiece.encode_batch(texts) == [e.ids for e in Tokenizer.from_file(WORDPIECE).encode_batch(
        texts, add_special_tokens=False)]
    folder = data.prepare(CORPUS, cache_dir=str(tmp_path), tok=wordpiece)
    assert folder != data.cache_folder(CORPUS, None, str(tmp_path), None)  # gpt2's tokens live elsewhere
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert (meta["tokenizer"], meta["dtype"]) == (WORDPIECE, "uint16")
    with lzma.open(CORPUS, "rt") as f:  # the 1st document is held out: its ids, then [SEP] to end it
        first = json.loads(f.readline())["text"]
    assert data.load_tokens(folder, "val")[:meta["val_tokens"]].tolist()[:200] == \
        (wordpiece.encode_batch([first])[0] + [v.sep])[:200]


def test_word_by_word_sends_each_distinct_word_once_and_falls_back_to_whole_texts(wordpiece):
    """The library sees each distinct word once, a separator between them; with no separator left (a word holds them
    all), or the one left made by the normalizer from another character ("=" from "≠"), it gets the texts whole."""
    from tokenizers import Tokenizer
    library, calls = Tokenizer.from_file(WORDPIECE), []

    def whole(texts):
        calls.append(texts)
        return [e.ids for e in library.encode_batch(texts, add_special_tokens=False)]

    marks = [c for c, _ in data.separators(wordpiece.hf.backend_tokenizer)]
    assert "=" in marks and "≠" not in marks and len(marks) > 10
    for texts, once in ((corpus_texts(20), True), (["x".join(marks) + " a b"], False),
                        (["x".join(m for m in marks if m != "=") + " a≠b c"], False)):
        calls.clear()
        assert data.encode_by_words(whole, data.separators(library), texts) == whole(texts)
        if once:  # words and separators alternate: each distinct word once
            sent = [w for part in calls[-2] for w in part.split(" ")[:-1]]
            assert len(set(sent[1::2])) == 1 and sorted(sent[::2]) == sorted({w for t in texts for w in t.split(" ")})
        else:
            assert calls[-2] == texts


def test_a_byte_level_bpe_is_encoded_whole_and_never_truncated(tmp_path):
    """Byte-level BPE carries a space into the next word's token: no word-by-word shortcut. A tokenizer.json saved with
    truncation on keeps every token of a long document."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus_texts(20), trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>", "<mask>"]))
    reference = [e.ids for e in bpe.encode_batch(corpus_texts(5) + TRICKY_TEXTS, add_special_tokens=False)]
    bpe.enable_truncation(8)
    bpe.save(str(tmp_path / "bpe.json"))
    tok = data.load_tokenizer(str(tmp_path / "bpe.json"))
    assert not data.encodes_word_by_word(tok.hf.backend_tokenizer)
    assert tok.encode_batch(corpus_texts(5) + TRICKY_TEXTS) == reference and len(reference[0]) > 8


def test_masking_follows_the_vocabulary():
    """Specials at the low ids (BERT's layout): never masked, never drawn as a random replacement."""
    v = data.Vocab(n_ids=200, pad=0, cls=2, sep=3, mask=4, eod=3, special=(0, 1, 2, 3, 4))
    ids = torch.randint(5, 200, (64, 40))
    ids[:, 0], ids[:, -1], ids[:, 20] = v.cls, v.sep, 1  # [UNK] in the middle of each row
    out, positions, targets = data.mask_tokens(ids, torch.arange(64), seed=0, vocab=v)
    assert not ((positions == 0) | (positions == 39) | (positions == 20)).any()
    changed = out.gather(1, positions) != ids.gather(1, positions)
    replaced = out.gather(1, positions)[changed & (out.gather(1, positions) != v.mask)]
    assert len(replaced) > 10 and replaced.min() >= 5 and replaced.max() < 200  # ordinary ids only


def test_token_files_widen_for_a_vocabulary_above_65536_ids(tmp_path):
    big = data.Vocab(n_ids=70_000, pad=69_996, cls=69_997, sep=69_998, mask=69_999, eod=69_998, special=tuple(range(69_996, 70_000)))
    tok = data.Tokenizer("big", big, lambda texts: [[66_000 + len(w) for w in t.split()] for t in texts])
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join("a bb ccc" for _ in range(3)) + "\n")
    folder = data.prepare(str(corpus), cache_dir=str(tmp_path / "cache"), tok=tok)
    assert data.load_tokens(folder, "val").tolist() == [66_001, 66_002, 66_003, 69_998]  # uint16 would wrap
    assert json.load(open(os.path.join(folder, "meta.json")))["dtype"] == "uint32"


@pytest.mark.parametrize("mode", ["full", "drop", "sctd"])
def test_pretraining_with_a_wordpiece_tokenizer(wordpiece, cache, tmp_path, mode):
    log = run_train(tmp_path, cache, "--tokenizer", WORDPIECE, "--mode", mode, "--steps", 4, "--eval_every", 4,
                    "--sctd_interval", 2)
    assert all(math.isfinite(r["loss"]) for r in log) and log[0]["loss"] == pytest.approx(math.log(4032), abs=0.5)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["tokenizer"] == WORDPIECE and ckpt["model_config"]["vocab_size"] == 4032
    assert ckpt["router"]["importance"].shape == (4032,) and (tmp_path / "tokenizer" / "tokenizer.json").exists()
    if mode != "full":  # the router learned WordPiece ids; [PAD] stays pinned at the bottom
        imp = ckpt["router"]["importance"]
        assert (imp[5:4000] != 10.0).any() and imp[wordpiece.vocab.pad] == float("-inf")


def test_resume_with_a_tokenizer_that_has_moved(wordpiece, cache, tmp_path):
    moved = tmp_path / "tok.json"
    shutil.copy(WORDPIECE, moved)
    args = ["--tokenizer", moved, "--mode", "drop", "--steps", 6, "--save_every", 3, "--eval_every", 100]
    whole = run_train(tmp_path / "a", cache, *args)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt_prev.pt", tmp_path / "b" / "ckpt.pt")  # the step-3 checkpoint
    shutil.copytree(tmp_path / "a" / "tokenizer", tmp_path / "b" / "tokenizer")  # the run folder's copy travels
    moved.unlink()
    resumed = run_train(tmp_path / "b", cache, "--mode", "drop", "--steps", 6, "--eval_every", 100, "--resume")
    assert [round(r["loss"], 5) for r in resumed] == [round(r["loss"], 5) for r in whole[3:]]
    shutil.rmtree(tmp_path / "b" / "tokenizer")  # nowhere left to find it: one line saying where it looked
    with pytest.raises(SystemExit, match=f"tokenizer {moved}, which loads neither from .*b/tokenizer nor from {moved}"):
        run_train(tmp_path / "b", cache, "--steps", 6, "--resume")


def tiny_wordpiece_bert(folder, vocab_size=4000):
    """A transformers BertForMaskedLM of an L2-H64-A2 shape (none of model.SIZES), random weights, saved with
    testdata's WordPiece as its tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256))
    hf.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_file=WORDPIECE, cls_token="[CLS]", sep_token="[SEP]",
                                         mask_token="[MASK]", pad_token="[PAD]", unk_token="[UNK]",
                                         model_input_names=data.MODEL_INPUTS).save_pretrained(folder)
    return folder


def test_the_export_frames_a_text_as_pretraining_did_whatever_the_tokenizer_had(cache, tmp_path):
    """A RoBERTa-style byte-level BPE as a user trains it, <s> <pad> </s> <unk> <mask> and no template: the exported
    tokenizer frames <s> a </s> and pairs <s> a </s> b </s> (token types 0 then 1) as pretraining and finetune.py do."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(corpus_texts(200), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    assert bpe.post_processor is None
    bpe.save(str(tmp_path / "bpe.json"))
    run_train(tmp_path / "out", cache, "--tokenizer", tmp_path / "bpe.json", "--steps", 2, "--eval_every", 2,
              "--position", "absolute")
    train.main(["--out_dir", str(tmp_path / "out"), "--export", str(tmp_path / "hf")])
    ours, texts = data.load_tokenizer(str(tmp_path / "bpe.json")), corpus_texts(40)
    v, ids = ours.vocab, ours.encode_batch(texts)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (v.cls, v.sep) == (0, 2) and exported(texts)["input_ids"] == [[v.cls, *i, v.sep] for i in ids]
    pairs = exported(texts[:20], texts[20:], max_length=64, truncation="longest_first")
    assert list(zip(pairs["input_ids"], pairs["token_type_ids"])) == \
        [finetune.encode_pair(a, b, 64, v) for a, b in zip(ids[:20], ids[20:])]
    init = finetune.load_init(finetune.parse_args(["--task", "sst2", "--ckpt", str(tmp_path / "hf")]))
    assert init.tok.vocab == v and init.tok.encode_batch(texts) == ids  # fine-tuning frames with encode_pair, as before


def test_continued_pretraining_of_a_wordpiece_bert_exports_and_finetunes(wordpiece, cache, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    bert = tiny_wordpiece_bert(tmp_path / "bert")
    run_train(tmp_path / "out", cache, "--init_from", bert, "--mode", "drop", "--steps", 3, "--eval_every", 3)
    assert "--size L2-H64-A2 --position absolute" in capsys.readouterr().err  # the model's shape and tokenizer, followed
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["tokenizer"] == str(bert) and ckpt["model_config"]["vocab_size"] == 4000
    train.main(["--out_dir", str(tmp_path / "out"), "--export", str(tmp_path / "hf")])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = corpus_texts(40)
    assert tok(texts)["input_ids"] == [[2, *ids, 3] for ids in wordpiece.encode_batch(texts)]
    want, got, _ = exported_logits(tmp_path / "out", tmp_path / "hf", wordpiece.vocab.mask)
    assert (got - want).abs().max() < 1e-4 and want.std() > 0.01
    scores = finetune.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--task", "sst2", "--data_dir", TESTDATA,
                            "--max_train", "32", "--epochs", "1", "--batch_size", "16", "--max_len", "64"])
    assert 0 <= scores["sst2"]["median"]["acc"] <= 100
    assert capsys.readouterr().out.count(f"init: {tmp_path / 'out' / 'ckpt.pt'}") == 1
    init = finetune.load_init(finetune.parse_args(["--task", "sst2", "--ckpt", str(tmp_path / "hf")]))
    assert init.tok.vocab == wordpiece.vocab  # the export's own tokenizer, not gpt2


def test_bad_tokenizer_input(wordpiece, cache, tmp_path):
    from tokenizers import Tokenizer, models
    lacking = tmp_path / "lacking.json"  # a [CLS] and a [SEP], no [MASK] nor [PAD]
    Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3}, unk_token="[UNK]")).save(str(lacking))
    bare = tmp_path / "bare.json"  # every role, no ordinary token to mask or train on
    Tokenizer(models.WordLevel({t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])},
                               unk_token="[UNK]")).save(str(bare))
    small = tiny_wordpiece_bert(tmp_path / "small", vocab_size=1000)
    untokenized = tmp_path / "untokenized"  # a BertForMaskedLM folder without tokenizer files
    shutil.copytree(small, untokenized, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "vocab*"))
    broken = tmp_path / "broken"  # its tokenizer.json cut short
    shutil.copytree(small, broken)
    (broken / "tokenizer.json").write_text((small / "tokenizer.json").read_text()[:100])
    offline = dict(HF_HUB_OFFLINE="1")
    for args, words in [(["--tokenizer", "no/such/tokenizer.json"], ["--tokenizer", "does not exist"]),
                        (["--tokenizer", "nobody/no-such-tokenizer"], ["--tokenizer", "neither gpt2 nor"]),
                        (["--tokenizer", str(lacking)], ["lacks [MASK] and [PAD]"]),
                        (["--init_from", str(small), "--tokenizer", WORDPIECE], ["4000 ids, more than the 1000 rows"])]:
        code, err = run_cli("train.py", "--size", "tiny", "--data", CORPUS, "--cache_dir", str(tmp_path / "cache"),
                            "--out_dir", str(tmp_path / "out"), *args, env=offline)
        assert code != 0 and one_line_error(err, *words), err
        assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # nothing written
    for args, words in [(["--tokenizer", str(bare)], "--tokenizer .* only special tokens"),  # local: in this process
                        (["--init_from", str(untokenized)], f"--init_from {untokenized} .* only special .* pass --tokenizer"),
                        (["--init_from", str(broken)], f"--init_from {broken} holds no tokenizer that loads .* pass --tokenizer")]:
        with pytest.raises(SystemExit, match=f"^error: {words}"):
            train.main(["--size", "tiny", "--data", CORPUS, "--cache_dir", str(tmp_path / "cache"),
                        "--out_dir", str(tmp_path / "out"), *args])
        assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match=f"--ckpt {untokenized} holds no tokenizer that loads .*only special"):
        finetune.main(["--task", "sst2", "--data_dir", TESTDATA, "--ckpt", str(untokenized)])


# ------------------------------------------------------------------------------------------------
# finetune.py: metrics against hand-computed values

def test_binary_metrics_hand_computed():
    pred = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    gold = np.array([1, 1, 0, 0, 1, 0, 0, 0])  # TP 2, FP 2, FN 1, TN 3
    assert finetune.accuracy(pred, gold) == pytest.approx(100 * 5 / 8)
    assert finetune.f1(pred, gold) == pytest.approx(100 * 4 / 7)  # 2TP / (2TP + FP + FN)
    assert finetune.mcc(pred, gold) == pytest.approx(100 * (2 * 3 - 2 * 1) / np.sqrt(4 * 3 * 5 * 4))
    assert finetune.mcc(np.ones(8), gold) == 0.0  # one class predicted: no correlation, not NaN
    assert finetune.mcc(gold, gold) == pytest.approx(100.0) and finetune.mcc(1 - gold, gold) == pytest.approx(-100.0)


def test_macro_f1_hand_computed():
    pred, gold = np.array([0, 1, 2, 2, 0]), np.array([0, 1, 1, 2, 2])
    # per class F1: 0: 2/3 (TP 1, FP 1); 1: 2/3 (TP 1, FN 1); 2: 1/2 (TP 1, FP 1, FN 1)
    assert finetune.macro_f1(pred, gold) == pytest.approx(100 * (2 / 3 + 2 / 3 + 1 / 2) / 3)


def test_correlations_hand_computed():
    x, y = np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 5, 9])
    assert finetune.pearson(x, y) == pytest.approx(100 * 11 / np.sqrt(5 * 26))
    assert finetune.pearson(x, np.full(4, 3.0)) == 0.0  # a constant prediction, not NaN
    assert finetune.ranks(np.array([10, 20, 20, 30])).tolist() == [1, 2.5, 2.5, 4]  # ties share their mean rank
    # ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]: r = 4.5 / sqrt(4.5 * 5)
    assert finetune.spearman(np.array([10, 20, 20, 30]), np.array([1, 3, 2, 4])) == pytest.approx(100 * 4.5 / np.sqrt(22.5))
    assert finetune.spearman(np.array([1, 2, 3]), np.array([1, 10, 100])) == pytest.approx(100.0)  # monotone


def test_finetuning_schedule_hand_computed():
    """BERT's: linear warm-up over 2 of 10 steps, then linear decay to 0 at step 10."""
    assert [finetune.lr_at(s, 1.0, 10, 2) for s in range(10)] == pytest.approx([0.5, 1, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8,
                                                                              2 / 8, 1 / 8])


def test_summary_keeps_the_lr_with_the_best_median():
    seeds = [dict(lr=1e-4, seed=s, scores=dict(f1=f, acc=a)) for s, f, a in [(0, 80, 70), (1, 90, 60), (2, 50, 50)]]
    seeds += [dict(lr=5e-5, seed=s, scores=dict(f1=f, acc=a)) for s, f, a in [(0, 78, 70), (1, 76, 70), (2, 10, 10)]]
    r = finetune.summarize(seeds)  # median of the mean score: 1e-4 -> 75, 5e-5 -> 73
    assert r["lr"] == 1e-4 and r["seeds"] == 3
    assert r["median"] == dict(f1=80, acc=60) and r["spread"] == dict(f1=[50, 90], acc=[50, 70])


# ------------------------------------------------------------------------------------------------
# finetune.py: the readers, on the fixtures (each the first rows of the original file)

BINARY, NLI3 = {0, 1}, {0, 1, 2}


READERS = [  # task, split, rows, labels, texts per pair (1: single sentence, 2: a pair)
    ("cola", "train", 40, BINARY, 1), ("cola", "dev", 20, BINARY, 1),
    ("sst2", "train", 40, BINARY, 1), ("sst2", "dev", 20, BINARY, 1),
    ("mrpc", "train", 40, BINARY, 2), ("mrpc", "dev", 20, BINARY, 2),
    ("stsb", "train", 40, None, 2), ("stsb", "dev", 20, None, 2),
    ("qnli", "dev", 20, BINARY, 2),
    ("rte", "train", 40, BINARY, 2), ("rte", "dev", 20, BINARY, 2),
    ("wnli", "train", 40, BINARY, 2), ("wnli", "dev", 20, BINARY, 2),
    ("boolq", "dev", 20, BINARY, 2),
    ("cb", "train", 40, NLI3, 2), ("cb", "dev", 20, NLI3, 2),
    ("copa", "train", 40, BINARY, 2), ("copa", "dev", 20, BINARY, 2),
    ("wic", "train", 40, BINARY, 2), ("wic", "dev", 20, BINARY, 2),
    ("sg_rte", "train", 40, BINARY, 2), ("sg_rte", "dev", 20, BINARY, 2),
]


@pytest.mark.parametrize("name,split,rows,labels,texts", READERS)
def test_reader_counts_and_labels(name, split, rows, labels, texts):
    task = finetune.TASKS[name]
    examples = finetune.read_split(task, TESTDATA, split)
    assert len(examples) == rows
    assert all(len(pairs) == task.choices for pairs, _ in examples)
    assert all(isinstance(a, str) and (b is None) == (texts == 1) for pairs, _ in examples for a, b in pairs)
    gold = [label for _, label in examples]
    if labels is None:  # STS-B: similarity scores from 0 to 5
        assert all(isinstance(g, float) and 0 <= g <= 5 for g in gold) and max(gold) == 5.0 and len(set(gold)) > 10
    else:
        assert set(gold) == labels


def test_reader_finds_tasks_from_either_folder():
    glue, superglue = os.path.join(TESTDATA, "glue"), os.path.join(TESTDATA, "superglue")
    assert len(finetune.read_split(finetune.TASKS["rte"], glue, "dev")) == 20
    assert len(finetune.read_split(finetune.TASKS["sg_rte"], superglue, "dev")) == 20
    with pytest.raises(ValueError, match="--data_dir .* no RTE/dev.tsv"):  # GLUE RTE is not in superglue/
        finetune.read_split(finetune.TASKS["rte"], superglue, "dev")


def test_a_file_of_another_format_fails_in_words(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\na fine film\tpositive\n")
    with pytest.raises(ValueError, match="row 1 is not sst2 data"):
        finetune.read_split(finetune.TASKS["sst2"], str(tmp_path), "dev")


@pytest.mark.parametrize("name", ["qnli", "qqp", "mnli", "boolq"])
def test_missing_split_fails_in_words(name):
    with pytest.raises(ValueError, match="--data_dir"):
        finetune.read_task(finetune.TASKS[name], TESTDATA, None)


def test_task_lists():
    assert finetune.task_names("glue") == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert finetune.task_names("superglue") == ["boolq", "cb", "copa", "wic", "sg_rte"]
    assert finetune.task_names("sst2, SuperGLUE,cb") == ["sst2", "boolq", "cb", "copa", "wic", "sg_rte"]


# ------------------------------------------------------------------------------------------------
# finetune.py: inputs ([CLS] a [SEP] b [SEP], token types, truncation, padding) and end to end

def test_pair_encoding_truncates_the_longer_text():
    enc = data.get_encoding()
    a, b = " one two three four five six", " seven eight"
    A, B = enc.encode_ordinary(a), enc.encode_ordinary(b)
    ids, types = finetune.encode_pair(A, B, max_len=8)  # room for 5 text tokens: a loses 3
    assert ids == [data.GPT2.cls] + A[:3] + [data.GPT2.sep] + B + [data.GPT2.sep]
    assert types == [0] * 5 + [1] * 3
    ids, types = finetune.encode_pair(A, None, max_len=5)
    assert ids == [data.GPT2.cls] + A[:3] + [data.GPT2.sep] and types == [0] * 5


def test_collate_pads_to_the_longest_row():
    examples = [([([1, 2, 3], [0, 0, 0]), ([4, 5], [0, 1])], 1), ([([6], [0]), ([7, 8, 9, 10], [0, 0, 1, 1])], 0)]
    ids, types, mask, labels = finetune.collate(examples, "cpu")
    assert ids.shape == types.shape == mask.shape == (4, 4)  # B * choices rows, T = the longest
    assert ids[1].tolist() == [4, 5, data.GPT2.pad, data.GPT2.pad] and types[3].tolist() == [0, 0, 1, 1]
    assert mask.sum(1).tolist() == [3, 2, 1, 4] and labels.tolist() == [1, 0]


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padding_does_not_change_the_prediction(pool):
    model = finetune.Classifier(tiny_model(), n_out=3, pool=pool).eval()
    short, long = [data.GPT2.cls, 10, 11, data.GPT2.sep], [data.GPT2.cls, *range(20, 30), data.GPT2.sep]
    examples = [([(short, [0] * 4)], 0), ([(long, [0] * 6 + [1] * 6)], 1)]
    padded = model(*finetune.collate(examples, "cpu")[:3])[0]  # the short row padded to 12 tokens
    alone = model(*finetune.collate(examples[:1], "cpu")[:3])[0]
    assert torch.allclose(padded, alone, atol=1e-5)
    h = model.bert.encode(torch.tensor([short]))[1][0]
    assert torch.allclose(alone, model.head(h[0] if pool == "cls" else h.mean(0)), atol=1e-5)


def test_training_batches_cover_every_example_once_with_similar_lengths():
    lengths = np.random.default_rng(0).integers(3, 128, 5000)
    examples = [([([0] * n, [0] * n)], 0) for n in lengths]
    batches = finetune.length_batches(examples, 32, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(5000)) and len(batches) == 157
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()  # random batches would pad to ~1.9x
    longest = [lengths[b].max() for b in batches]
    assert longest != sorted(longest)  # the batches come in random order, not short to long


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint in train.py's format, of an untrained tiny BERT."""
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    cfg = BertConfig(**SIZES["tiny"])
    torch.manual_seed(0)
    torch.save(dict(model=Bert(cfg).state_dict(), model_config=asdict(cfg), config=dict(size="tiny", mode="drop"),
                    step=7), path)
    return str(path)


def test_a_probe_trains_the_head_alone_on_fixed_features(tiny_ckpt):
    args = finetune.parse_args(["--task", "stsb", "--ckpt", tiny_ckpt, "--probe", "--max_len", "32"])
    args.device, args.dtype = "cpu", "fp32"
    init, task = finetune.load_init(args), finetune.TASKS["stsb"]
    rows = finetune.read_task(task, TESTDATA, 64)
    examples = {split: finetune.tokenize(data.load_tokenizer(), r[:64], 32) for split, r in rows.items()}
    made = []

    class Kept(finetune.Classifier):  # keeps the model finetune() builds, and the head it starts from
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append((self, self.head.weight.detach().clone()))

    with mock.patch.object(finetune, "Classifier", Kept):
        finetune.finetune(task, examples, init, args, lr=1e-2, seed=0)
    model, head_at_start = made[0]
    model.train()
    assert not model.bert.training and model.head.training  # no dropout in the features, even in training mode
    assert all(torch.equal(v, init.state[k]) for k, v in model.bert.state_dict().items())
    assert not torch.equal(model.head.weight, head_at_start)


def test_finetune_end_to_end(tiny_ckpt, tmp_path):
    out = tmp_path / "scores.json"
    argv = ["--ckpt", tiny_ckpt, "--task", "sst2,rte", "--data_dir", TESTDATA, "--max_train", "32", "--epochs", "1",
            "--batch_size", "16", "--max_len", "64", "--lr", "1e-4,1e-3", "--json", str(out)]
    # in a fresh process: fine-tuning from local files must not even import `datasets`
    code = f"import sys, finetune; finetune.main({argv!r}); assert 'datasets' not in sys.modules"
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "| sst2 | acc |" in p.stdout and "| rte | acc |" in p.stdout
    results = json.loads(out.read_text())
    assert "step 7" in results["init"]
    for name in ("sst2", "rte"):
        r = results["results"][name]
        assert r["lr"] in (1e-4, 1e-3) and len(r["runs"]) == 2 and 0 <= r["median"]["acc"] <= 100


def test_finetune_bf16_autocast(tiny_ckpt, tmp_path):
    """--dtype bf16 (CPUs run it too) trains and scores; a regression task's predictions must leave bf16 for numpy."""
    out = tmp_path / "scores.json"
    finetune.main(["--ckpt", tiny_ckpt, "--task", "stsb", "--data_dir", TESTDATA, "--max_train", "32", "--epochs", "1",
                   "--batch_size", "16", "--max_len", "64", "--lr", "1e-4", "--dtype", "bf16", "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["config"]["dtype"] == "bf16"
    assert all(-100 <= v <= 100 for v in results["results"]["stsb"]["median"].values())


def test_finetune_saves_the_encoder_for_another_finetuning(tiny_ckpt, tmp_path):
    """--save_dir writes each run's fine-tuned encoder, and --ckpt starts from it (an intermediate task first)."""
    finetune.main(["--ckpt", tiny_ckpt, "--task", "stsb", "--data_dir", TESTDATA, "--max_train", "32", "--epochs", "1",
                   "--batch_size", "16", "--max_len", "64", "--lr", "1e-3", "--seeds", "3", "--save_dir", str(tmp_path)])
    pretrained = finetune.load_init(finetune.parse_args(["--task", "rte", "--ckpt", tiny_ckpt]))
    tuned = finetune.load_init(finetune.parse_args(["--task", "rte", "--ckpt", str(tmp_path / "stsb_lr0.001_seed3.pt")]))
    assert "fine-tuned on stsb lr 0.001 seed 3" in tuned.source and tiny_ckpt in tuned.source
    assert tuned.model_config == pretrained.model_config and tuned.state.keys() == pretrained.state.keys()
    moved = [k for k in pretrained.state if not torch.equal(tuned.state[k], pretrained.state[k])]
    assert len(moved) > len(pretrained.state) // 2  # the weights after fine-tuning, not the ones it started from


def test_random_init_keeps_the_architecture_not_the_weights(tiny_ckpt):
    args = finetune.parse_args(["--task", "sst2", "--ckpt", tiny_ckpt])
    trained = finetune.load_init(args)
    assert trained.model_config["n_embd"] == 128 and trained.state is not None
    args = finetune.parse_args(["--task", "sst2", "--ckpt", tiny_ckpt, "--init", "random"])
    random = finetune.load_init(args)
    assert random.model_config == trained.model_config and random.state is None


# ------------------------------------------------------------------------------------------------
# bench.py (no timing assertions: speed is bench.py's output, not a test's)

def test_bench_smoke():
    rows = bench.benchmark(bench.parse_args(["--sizes", "tiny", "--seq_lens", "32", "--batch_size", "2",
                                             "--steps", "2", "--warmup", "1"]))
    assert [r["mode"] for r in rows] == ["full", "drop", "sctd_step", "sctd_hybrid"]
    fields = {"size", "seq_len", "batch_size", "keep", "mode", "kind", "ms_per_step", "spread", "tokens_per_s", "speedup",
              "flops_speedup", "tflops", "mfu", "step_gb"}  # mfu, step_gb: None on CPU
    for r in rows:
        assert set(r) == fields and r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0
    full, drop, sctd, hybrid = rows
    assert full["speedup"] == full["flops_speedup"] == 1
    assert drop["flops_speedup"] > 1 > sctd["flops_speedup"]  # a ScTD step adds a full pass to the dropped one
    assert drop["flops_speedup"] > hybrid["flops_speedup"] > sctd["flops_speedup"]
    # ScTD's step in both layer schedules, and the dropping steps its hybrid averages with
    rows = bench.benchmark(bench.parse_args(["--sizes", "mini", "--seq_lens", "32", "--batch_size", "2", "--steps", "2",
                                             "--warmup", "0", "--modes", "sctd", "layerwise"]))
    assert [r["mode"] for r in rows] == ["full", "drop", "sctd_step", "sctd_hybrid", "drop layerwise",
                                         "sctd_step layerwise", "sctd_hybrid layerwise"]


def test_bench_profile_sorts_a_step_into_kinds_of_work():
    rows = bench.benchmark(bench.parse_args(["--sizes", "tiny", "--seq_lens", "32", "--batch_size", "2", "--steps", "2",
                                             "--warmup", "1", "--profile"]))
    full, drop, sctd = (r["profile_ms"] for r in rows[:3])
    assert set(full) == {kind for kind, _ in bench.OP_KINDS} | {"other"}
    assert all(p["matmul"] > 0 and p["AdamW and clipping"] > 0 for p in (full, drop, sctd))
    assert full["sort/top-k (router)"] == 0 < drop["sort/top-k (router)"]  # the router sorts only when tokens drop


def fake_run(folder, mode, evals, seed=1337, kinds=(), **config):
    """A finished run as bench.py --runs reads it: config.json and log.jsonl's evaluations (with their steps of each kind)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(dict(mode=mode, router="loss", seed=seed, time_budget=0.5), **config)))
    with open(folder / "log.jsonl", "w") as f:
        for (step, seconds, val_loss), k in zip(evals, kinds or [None] * len(evals)):
            f.write(json.dumps(dict(step=step, loss=7.0, train_time=seconds, tokens=(step + 1) * 100, val_loss=val_loss,
                                    val_order_gap=1.0, **(dict(kinds=k) if k else {}))) + "\n")


def test_bench_times_runs_to_a_target_loss(tmp_path, capsys):
    fake_run(tmp_path / "full", "full", [(9, 10, 6.0), (19, 20, 5.0), (29, 30, 4.0)])
    # a run that logged step 39 but crashed before saving, resumed from step 15: the resumed records replace all from there
    fake_run(tmp_path / "drop", "drop", [(9, 10, 5.5), (19, 20, 9.9), (29, 30, 3.9), (39, 40, 3.0), (19, 20, 4.5),
                                         (29, 30, 4.2)])
    dirs = [str(tmp_path / "full"), str(tmp_path / "drop")]
    # default target: the highest best loss, 4.2; full reaches it at 20 + 10 * 0.8 s, drop at 30 s
    full, drop = bench.compare_runs(bench.parse_args(["--runs", *dirs]))
    assert full["min to 4.200"] * 60 == pytest.approx(28) and drop["min to 4.200"] * 60 == pytest.approx(30)
    assert drop["saving at 4.200"] == pytest.approx(1 - 30 / 28) and full["saving at 4.200"] is None
    assert drop["tokens vs full at 4.200"] == pytest.approx(3000 / 2800)  # 100 tokens a step: at 4.2, 3000 against 2800
    assert (drop["steps"], drop["tokens_M"], drop["steps/s"], drop["val_loss"]) == (30, 3e-3, 1.0, 4.2)
    assert drop["steps/s vs full"] == pytest.approx(1.0)  # 30 steps in 30 s, as full's 30 in 30 s
    # several targets; a second seed, whose drop run is twice as fast a step: savings per seed, then mean and range
    fake_run(tmp_path / "full2", "full", [(9, 10, 6.0), (19, 20, 5.0)], seed=7)
    fake_run(tmp_path / "drop2", "drop", [(19, 10, 5.0)], seed=7)
    dirs += [str(tmp_path / "full2"), str(tmp_path / "drop2")]
    capsys.readouterr()
    full, drop, _, drop2 = bench.compare_runs(bench.parse_args(["--runs", *dirs, "--target_loss", "5.0", "4.1"]))
    assert full["min to 5.000"] * 60 == pytest.approx(20) and drop["min to 5.000"] * 60 == pytest.approx(15)
    assert drop["saving at 5.000"] == pytest.approx(0.25) and drop2["saving at 5.000"] == pytest.approx(0.5)
    assert drop2["steps/s vs full"] == pytest.approx(2.0)
    assert drop["tokens vs full at 5.000"] == pytest.approx(0.75) and drop2["tokens vs full at 5.000"] == pytest.approx(1)
    assert drop["min to 4.100"] is None and drop["saving at 4.100"] is None  # never reached: a dash in the table
    out = capsys.readouterr().out
    assert ("saving at 5.000 over 2 seeds: mean +38%, range [+25%, +50%]; by its step speed alone: mean +25% (it keeps "
            "150% of that); tokens vs full: mean 0.88x, range [0.75x, 1.00x]") in out
    assert "saving at 4.100 over" not in out  # no seed reached it: no summary line
    # fine-tuning scores saved beside a run (finetune.py --json) become columns: each task's first metric, its median
    ft_runs = [dict(lr=1e-4, seed=s, scores=dict(f1=f, acc=a)) for s, f, a in [(0, 80, 70), (1, 90, 60), (2, 50, 50)]]
    with open(tmp_path / "drop" / "finetune-a.json", "w") as f:
        json.dump(dict(init="drop", config={}, results=dict(mrpc=finetune.summarize(ft_runs))), f)
    full, drop, *_ = bench.compare_runs(bench.parse_args(["--runs", *dirs]))
    assert drop["mrpc f1"] == 80 and full["mrpc f1"] is None and "| mrpc f1 |" in capsys.readouterr().out
    # another file's seeds are pooled with them; its run of seed 2 replaces the first file's
    more = [dict(lr=1e-4, seed=s, scores=dict(f1=f, acc=a)) for s, f, a in [(2, 95, 50), (3, 96, 50)]]
    with open(tmp_path / "drop" / "finetune-b.json", "w") as f:
        json.dump(dict(init="drop", config={}, results=dict(mrpc=finetune.summarize(more))), f)
    _, drop, *_ = bench.compare_runs(bench.parse_args(["--runs", *dirs]))
    assert drop["mrpc f1"] == np.median([80, 90, 95, 96])
    code, err = run_cli("bench.py", "--runs", str(tmp_path))
    assert code != 0 and one_line_error(err, "--runs"), err
    # the figure's legend: one entry per method, on its first run
    assert bench.legend_labels([dict(method=m, config=dict(seed=s)) for m, s in [("full", 1), ("drop", 1), ("full", 2),
                                                                                 ("drop", 2), ("sctd", 1)]]) == [
        "full, 2 seeds", "drop, 2 seeds", None, None, "sctd, seed 1"]
    pytest.importorskip("matplotlib")
    bench.compare_runs(bench.parse_args(["--runs", *dirs, "--plot", str(tmp_path / "curves.png")]))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_models_time_from_step_kinds_and_tells_methods_apart(tmp_path, capsys):
    shape = dict(size="mini", seq_len=64, batch_size=4)
    times = step_times_file(tmp_path / "steps.json", full=2000, drop_k_32=1000, drop_k_16=500, drop_k_48=1500,
                            sctd_k_32=3000, drop_k_32_layerwise=800)
    fake_run(tmp_path / "full", "full", [(9, 10, 6.0), (19, 20, 5.0)], **shape)
    # older runs logged no kinds: every step is the mode's (ScTD: steps 0, 2, 4, ... its own kind, Fi = 2)
    fake_run(tmp_path / "drop", "drop", [(9, 5, 6.0), (19, 10, 5.0)], router="random", **shape)
    fake_run(tmp_path / "sctd", "sctd", [(19, 20, 5.0)], sctd_interval=2, **shape)
    # one seed, another keep: its own method, whose clock ran slow (10 s) where its steps model 4 x 0.5 + 6 x 2 s
    fake_run(tmp_path / "quarter", "drop", [(9, 10, 5.0)], router="random", keep=0.25, keep_ramp=0.5,
             kinds=[{"drop k=16": 4, "full": 6}], **shape)
    dirs = [str(tmp_path / name) for name in ("full", "drop", "sctd", "quarter")]
    full, drop, sctd, quarter = bench.compare_runs(bench.parse_args(["--runs", *dirs, "--target_loss", "5.0",
                                                                     "--step_times", times]))
    assert [r["method"] for r in (full, drop, sctd, quarter)] == [
        "full", "drop (random router)", "sctd (loss router, sctd_interval 2)", "drop (random router, keep 0.25, keep_ramp 0.5)"]
    assert full["modelled min to 5.000"] * 60 == 40 and drop["modelled min to 5.000"] * 60 == 20
    assert sctd["modelled min to 5.000"] * 60 == 10 * 3 + 10 * 1  # 10 ScTD steps and 10 dropping steps
    assert quarter["modelled min to 5.000"] * 60 == 4 * 0.5 + 6 * 2
    assert quarter["modelled saving at 5.000"] == pytest.approx(1 - 14 / 40) and quarter["saving at 5.000"] == 0.5
    assert drop["modelled steps/s vs full"] == pytest.approx(2.0)
    out = capsys.readouterr().out
    assert "drop (random router, keep 0.25, keep_ramp 0.5), saving at 5.000 over 1 seeds: mean +50%" in out
    assert "modelled mean +65%, range [+65%, +65%]" in out
    # a run made on the modelled clock: its train_time measured nothing, so only its modelled columns fill; it
    # records its tokenizer, which the older runs did not: the same gpt2, so no label shows it
    fake_run(tmp_path / "ltd", "drop", [(9, 99, 5.0)], router="random", layerwise=True, step_times=times, tokenizer="gpt2",
             kinds=[{"drop k=32 layerwise": 10}], **shape)
    *_, ltd = bench.compare_runs(bench.parse_args(["--runs", *dirs, str(tmp_path / "ltd"), "--target_loss", "5.0",
                                                   "--step_times", times]))
    assert ltd["min to 5.000"] is None and ltd["saving at 5.000"] is None and ltd["steps/s vs full"] is None
    assert ltd["modelled saving at 5.000"] == pytest.approx(1 - 8 / 40)
    out = capsys.readouterr().out
    assert ("drop (random router, layerwise), saving at 5.000 over 1 seeds: modelled mean +80%, range [+80%, +80%]; "
            "by its modelled step speed alone: mean +60% (it keeps 133% of that); tokens vs full: mean 0.50x") in out
    # runs that all ran on the modelled clock: the measured columns, empty, are left out of the table
    bench.compare_runs(bench.parse_args(["--runs", str(tmp_path / "ltd"), "--target_loss", "5.0", "--step_times", times]))
    header = capsys.readouterr().out.splitlines()[0]
    assert "| modelled min to 5.000 |" in header and "| min to 5.000 |" not in header and "| steps/s |" not in header
    fake_run(tmp_path / "wider", "drop", [(9, 10, 5.0)], router="random", layerwise=True, keep=0.75, **shape)
    with pytest.raises(ValueError, match="no time for drop k=48 layerwise"):
        bench.compare_runs(bench.parse_args(["--runs", str(tmp_path / "wider"), "--step_times", times]))


def test_bench_names_the_seeds_a_mean_leaves_out(tmp_path, capsys):
    # full reaches 5.0 in 20 s at seeds 1, 2 and 4, not at 3; the loss router's run of seed 2 never does
    for seed, full_loss, drop_loss in [(1, 5.0, 5.0), (2, 5.0, 5.5), (3, 5.5, 5.0), (4, 5.0, 5.0)]:
        fake_run(tmp_path / f"full-{seed}", "full", [(19, 20, full_loss)], seed=seed)
        fake_run(tmp_path / f"drop-{seed}", "drop", [(19, 10, drop_loss)], seed=seed)
    # the random router saves 40 / 80 / 45%: the higher mean (55% against 50%), but behind at both seeds they share
    for seed, seconds in [(1, 12), (2, 4), (4, 11)]:
        fake_run(tmp_path / f"random-{seed}", "drop", [(19, seconds, 5.0)], seed=seed, router="random")
    bench.compare_runs(bench.parse_args(["--runs", *map(str, sorted(tmp_path.iterdir())), "--target_loss", "5.0"]))
    out = capsys.readouterr().out
    assert ("drop (loss router), saving at 5.000 over 2 seeds (seed 2 never reached it) (seed 3: no full run of its seed "
            "reached it): mean +50%") in out
    assert ("drop (loss router) ahead of drop (random router) at 5.000, saving seed by seed: by +8 points, range [+5, +10]; "
            "ahead at 2 of 2 seeds") in out


def test_bench_pairs_each_method_with_the_next_seed_by_seed(tmp_path, capsys):
    # three seeds; full reaches 5.0 at 20 s. A in 20 steps at 10/12/14 s (saves 50/40/30%, all of its step speed's
    # promise); B in 30 steps at 15/11/16 s (saves 25/45/20%, its steps alone would save 50/63/47%)
    for seed, a, b in [(1, 10, 15), (2, 12, 11), (3, 14, 16)]:
        fake_run(tmp_path / f"full-{seed}", "full", [(9, 10, 6.0), (19, 20, 5.0)], seed=seed)
        fake_run(tmp_path / f"a-{seed}", "drop", [(19, a, 5.0)], seed=seed, router="random")
        fake_run(tmp_path / f"b-{seed}", "drop", [(29, b, 5.0)], seed=seed)
    fake_run(tmp_path / "c-1", "drop", [(19, 1, 5.0)], seed=1, router="random", keep=0.25)  # one seed: first, paired with none
    json_path = tmp_path / "runs.json"
    bench.compare_runs(bench.parse_args(["--runs", *map(str, sorted(tmp_path.iterdir())), "--target_loss", "5.0",
                                         "--json", str(json_path)]))
    out = capsys.readouterr().out
    assert "drop (random router), saving at 5.000 over 3 seeds: mean +40%, range [+30%, +50%]; by its step speed alone: mean +40% (it keeps 100% of that)" in out
    assert "drop (loss router), saving at 5.000 over 3 seeds: mean +30%" in out and "(it keeps 56% of that)" in out
    # A - B seed by seed: +25, -5, +10 points; A wins 2 of 3: p = (3 + 1) / 8
    assert ("drop (random router) ahead of drop (loss router) at 5.000, saving seed by seed: by +10 points, range [-5, +25]; "
            "ahead at 2 of 3 seeds (sign test, one-sided: p = 0.500)") in out
    [lead] = json.loads(json_path.read_text())["leads"]
    assert (lead["seeds"], lead["wins"], lead["sign_p"]) == (3, 2, 0.5) and lead["mean"] == pytest.approx(0.1)
    assert "keep 0.25) ahead" not in out  # the one-seed method ranks first but leads nothing


# ------------------------------------------------------------------------------------------------
# Bad input, every entry point: one line naming the flag, a non-zero exit, nothing written

BAD_TRAIN_INPUT = [
    (["--size", "huge"], "--size"),
    (["--seq_len", "1024"], "--seq_len"),
    (["--seq_len", "4"], "--seq_len"),
    (["--batch_size", "0"], "--batch_size"),
    (["--data", "no/such/file.jsonl"], "--data"),
    (["--mode", "drop", "--keep", "1.5"], "--keep"),
    (["--mode", "drop", "--keep", "0"], "--keep"),
    (["--mode", "drop", "--keep", "0.1"], "--keep"),
    (["--mode", "sctd", "--sctd_interval", "0"], "--sctd_interval"),
    (["--router", "oracle"], "--router"),
    (["--mask_rate", "0"], "--mask_rate"),
    (["--mask_rate", "1"], "--mask_rate"),
    (["--mode", "drop", "--mask_rate", "0.6"], "--keep"),  # 76 masked tokens do not fit in the 64 kept
    (["--time_budget", "0", "--warmup", "5"], "--time_budget"),
    (["--time_budget", "60"], "--warmup"),
    (["--mode", "drop", "--layerwise"], "--layerwise"),  # tiny has no layer between its first and last
    (["--mode", "drop", "--keep_ramp", "1.5"], "--keep_ramp"),
    (["--mode", "drop", "--full_end", "1"], "--full_end"),
    (["--mode", "drop", "--random_share", "0.8"], "--random_share"),  # 51 of 64 kept at random: the 21 always kept do not fit
    (["--step_times", "no/such/bench.json"], "--step_times"),
    (["--data_config", "wikitext-2-raw-v1"], "--data_config"),  # the corpus is a local file
    (["--resume", "--out_dir", "/nonexistent/out"], "--resume"),
]


@pytest.mark.parametrize("args,flag", BAD_TRAIN_INPUT)
def test_bad_train_input(args, flag, cache, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--size", "tiny", "--data", CORPUS, "--cache_dir", cache, *args])
    err = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and one_line_error(err, flag), err


@pytest.mark.parametrize("flag", ["--resume", "--eval_only"])
def test_missing_checkpoint_fails_before_data_preparation(tmp_path, flag):
    code, err = run_cli("train.py", "--size", "tiny", "--data", CORPUS, "--cache_dir", str(tmp_path / "cache"),
                        "--out_dir", str(tmp_path / "out"), flag)
    assert code != 0 and one_line_error(err, flag, "no checkpoint") and not (tmp_path / "cache").exists(), err


def test_empty_corpus_and_offline_hub(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    code, err = run_cli("train.py", "--size", "tiny", "--data", str(empty), "--cache_dir", str(tmp_path))
    assert code != 0 and one_line_error(err, "--data"), err
    code, err = run_cli("train.py", "--size", "tiny", "--data", "nobody/no-such-dataset", "--cache_dir", str(tmp_path),
                        env=dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert code != 0 and one_line_error(err, "offline", "--data"), err


@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, folder / "foreign.pt")
    cfg = BertConfig(**dict(SIZES["tiny"], n_layer=1), vocab_size=1024)
    torch.save(dict(model=Bert(cfg).state_dict(), model_config=asdict(cfg)), folder / "vocab.pt")
    return folder


BAD_FINETUNE_INPUT = [
    (["--task", "sst3"], "--task"),
    (["--task", "sst2", "--init", "random", "--data_dir", "/no/such/folder"], "--data_dir"),
    (["--task", "qnli", "--init", "random"], "--data_dir"),  # the fixtures have QNLI's dev split, not its train split
    (["--task", "sst2", "--ckpt", "/no/such/ckpt.pt"], "--ckpt"),
    (["--task", "sst2", "--ckpt", "{bad}/text.pt"], "--ckpt"),
    (["--task", "sst2", "--ckpt", "{bad}/foreign.pt"], "--ckpt"),
    (["--task", "sst2", "--ckpt", "{bad}/vocab.pt"], "vocabulary"),
    (["--task", "sst2", "--init", "random", "--max_len", "1024"], "--max_len"),
    (["--task", "sst2", "--init", "random", "--lr", "fast"], "--lr"),
    (["--task", "sst2", "--init", "random", "--dropout", "1.5"], "--dropout"),
    (["--task", "sst2", "--init", "random", "--size", "huge"], "--size"),
    (["--task", "sst2", "--init", "random", "--save_dir", "{bad}/text.pt"], "--save_dir"),
]


@pytest.mark.parametrize("args,flag", BAD_FINETUNE_INPUT)
def test_bad_finetune_input(args, flag, bad_ckpts, capsys):
    args = [a.format(bad=bad_ckpts) for a in args]
    with pytest.raises(SystemExit) as e:
        finetune.main(["--data_dir", TESTDATA, *args])
    err = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and one_line_error(err, flag), err


@pytest.fixture(scope="module")
def foreign_models(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("foreign")
    small = dict(vocab_size=data.GPT2.size, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        vocab_size=data.GPT2.size, n_layers=1, n_heads=2, dim=16, hidden_dim=64)).save_pretrained(folder / "distil")
    transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=16, hidden_act="gelu_new", **small)).save_pretrained(folder / "gelu_new")
    (folder / "full").mkdir()
    (folder / "full" / "keep.txt").write_text("mine")
    (folder / "foreign").mkdir()
    torch.save({"weights": torch.zeros(2)}, folder / "foreign" / "ckpt.pt")
    return folder


BAD_INTEROP = [
    (["--export", "{f}/full"], "--export", "not empty"),
    (["--out_dir", "{f}/foreign", "--export", "{f}/out"], "--export", "not a train.py checkpoint"),
    (["--init_from", "{f}/distil"], "--init_from", "DistilBertForMaskedLM"),
    (["--init_from", "{f}/gelu_new"], "--init_from", "hidden_act='gelu_new'"),
    (["--init_from", "{f}/full"], "--init_from", "does not load"),
]


@pytest.mark.parametrize("args,flag,words", BAD_INTEROP)
def test_bad_interop_input(args, flag, words, foreign_models, cache, capsys):
    before = sorted(p.name for p in foreign_models.rglob("*"))
    with pytest.raises(SystemExit) as e:
        train.main(["--size", "tiny", "--data", CORPUS, "--cache_dir", cache, *(a.format(f=foreign_models) for a in args)])
    err = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and one_line_error(err, flag, words), err
    assert sorted(p.name for p in foreign_models.rglob("*")) == before  # nothing written, nothing set aside


def test_bad_bench_input():
    code, err = run_cli("bench.py", "--keep", "1.5")
    assert code != 0 and one_line_error(err, "--keep"), err
