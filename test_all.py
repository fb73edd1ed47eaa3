"""
The method, as tests. CPU, offline, tiny sizes: `pytest -q test_all.py`.
Needs the gpt2 BPE offline: TIKTOKEN_CACHE_DIR=../shared/data/tiktoken_cache (set below if unset).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")
CORPUS = os.path.join(SHARED, "corpus", "enwiki_small_train.jsonl.xz")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

import data  # noqa: E402
import train  # noqa: E402
from dropping import FIRST, LAST, Router, layer_schedule  # noqa: E402
from loss import cls_kl, mlm_loss, sctd_loss  # noqa: E402
from model import SIZES, Bert, BertConfig  # noqa: E402


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The small Wikipedia corpus, prepared once for the whole session."""
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    data.prepare(CORPUS, cache_dir=cache_dir)
    return cache_dir


def tiny_model(n_layer=2, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return Bert(BertConfig(**dict(SIZES["tiny"], n_layer=n_layer), dropout=dropout)).eval()


def real_batch(cache, batch_size=4, seq_len=64, seed=0):
    tokens = data.load_tokens(data.cache_folder(CORPUS, None, cache, None), "train")
    return data.Batches(tokens, seq_len, seed, torch.device("cpu")).get(torch.arange(batch_size).numpy())


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
# The model

def test_shapes():
    model = tiny_model()
    ids = torch.randint(0, 50000, (3, 16))
    positions = torch.tensor([[1, 5, 7]] * 3)
    logits, h_last_in, h_out = model(ids, positions)
    assert logits.shape == (3, 3, data.VOCAB_SIZE)
    assert h_last_in.shape == h_out.shape == (3, 16, 128)
    assert data.VOCAB_SIZE % 64 == 0 and data.VOCAB_SIZE > data.MASK


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


# ------------------------------------------------------------------------------------------------
# Data: packing and dynamic masking

def test_packing_cls_first_sep_last(cache):
    b = real_batch(cache, batch_size=8, seq_len=40)
    assert b.input_ids.shape == (8, 40)
    assert (b.input_ids[:, 0] == data.CLS).all() and (b.input_ids[:, -1] == data.SEP).all()
    assert not (b.input_ids == data.PAD).any()  # packed rows: no padding in pretraining


def test_masking_statistics(cache):
    b = real_batch(cache, batch_size=512, seq_len=128)
    targets, positions = b.mlm_targets, b.mlm_positions
    original = b.input_ids.clone().scatter_(1, positions, targets.clamp(min=0))
    special = original >= data.EOT
    valid = targets >= 0
    assert not special.gather(1, positions)[valid].any()  # a special token is never masked
    assert abs(valid.sum().item() / (~special).sum().item() - 0.15) < 0.01
    now, was = b.input_ids.gather(1, positions)[valid], targets[valid]
    to_mask = (now == data.MASK).float().mean().item()
    unchanged = (now == was).float().mean().item()
    assert abs(to_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02 and abs(1 - to_mask - unchanged - 0.1) < 0.02
    assert (b.input_ids[:, 0] == data.CLS).all() and (b.input_ids[:, -1] == data.SEP).all()


def test_masking_is_per_example_not_per_batch(cache):
    """Example 5 is masked the same way in a batch of 8 and in a batch of 2 (what makes DDP exact)."""
    batches = data.Batches(data.load_tokens(data.cache_folder(CORPUS, None, cache, None), "train"), 32, 3,
                           torch.device("cpu"))
    big = batches.get(torch.arange(8).numpy())
    small = batches.get(torch.arange(4, 6).numpy())
    assert torch.equal(big.input_ids[5], small.input_ids[1]) and torch.equal(big.noise[5], small.noise[1])
    assert not torch.equal(big.input_ids[4], big.input_ids[5])


# ------------------------------------------------------------------------------------------------
# Token dropping

def test_layer_schedule():
    assert layer_schedule(12) == ["full"] * 5 + ["first"] + ["dropped"] * 5 + ["last"]
    assert layer_schedule(24).index("first") == 11 and layer_schedule(24).count("dropped") == 11
    assert layer_schedule(2) == ["first", "last"]
    with pytest.raises(ValueError, match="at least 2 layers"):
        layer_schedule(1)


def test_keep_all_equals_full_path(cache):
    model = tiny_model(n_layer=4)
    b = real_batch(cache)
    T = b.input_ids.size(1)
    keep_idx = torch.arange(T).expand(b.input_ids.size(0), -1)
    with torch.no_grad():
        full = model(b.input_ids, b.mlm_positions)
        drop = model(b.input_ids, b.mlm_positions, keep_idx)
    for a, c in zip(full, drop):
        assert (a - c).abs().max() < 1e-5


def test_dropped_tokens_rejoin_unchanged(cache):
    model = tiny_model(n_layer=6)
    b = real_batch(cache)
    first, last = layer_schedule(6).index(FIRST), layer_schedule(6).index(LAST)
    seen = {}
    model.layers[first].register_forward_pre_hook(lambda m, a: seen.__setitem__("first_in", a[0]))
    model.layers[last].register_forward_pre_hook(lambda m, a: seen.__setitem__("last_in", a[0]))
    router = Router(data.VOCAB_SIZE, data.SPECIAL_IDS, data.PAD, data.CLS)
    keep_idx = router.select(b.input_ids, 32, b.noise)
    with torch.no_grad():
        model(b.input_ids, b.mlm_positions, keep_idx)
    dropped = torch.ones_like(b.input_ids, dtype=torch.bool).scatter(1, keep_idx, False)
    assert dropped.sum() == b.input_ids.numel() - keep_idx.numel()
    assert torch.equal(seen["last_in"][dropped], seen["first_in"][dropped])
    assert not torch.allclose(seen["last_in"][~dropped], seen["first_in"][~dropped])


def test_router_keeps_specials_and_drops_pad_first():
    router = Router(data.VOCAB_SIZE, data.SPECIAL_IDS, data.PAD, data.CLS)
    router.importance[100:110] = torch.arange(10.0)  # id 109 most important
    ids = torch.tensor([[data.CLS, 100, data.MASK, 109, 105, data.PAD, data.SEP, 101, data.PAD, 108]])
    keep = router.select(ids, 6, torch.rand(1, 10))
    assert keep.tolist() == [[0, 2, 3, 4, 6, 9]]  # specials, then 109 > 108 > 105; no [PAD]
    # with more pinned tokens than room, [CLS] still survives and [PAD] goes before everything else
    ids = torch.tensor([[data.MASK] * 4 + [data.CLS] + [data.PAD] * 3])
    for seed in range(20):
        keep = router.select(ids, 3, torch.rand(1, 8, generator=torch.Generator().manual_seed(seed)))
        assert 4 in keep.tolist()[0] and max(keep.tolist()[0]) <= 4
        assert keep.tolist()[0] == sorted(keep.tolist()[0])


def test_router_breaks_ties_at_random():
    router = Router(data.VOCAB_SIZE, data.SPECIAL_IDS, data.PAD, data.CLS)
    ids = torch.tensor([[data.CLS] + [7] * 15])
    picks = {tuple(router.select(ids, 4, torch.rand(1, 16)).tolist()[0]) for _ in range(20)}
    assert len(picks) > 5 and all(p[0] == 0 for p in picks)


def test_importance_update_hand_computed():
    router = Router(data.VOCAB_SIZE, data.SPECIAL_IDS, data.PAD, data.CLS, beta=0.9)
    # id 5 occurs twice (losses 2 and 4 -> mean 3), id 9 once (loss 1), one ignored slot
    router.observe(None, torch.tensor([5, 9, 5, -100]), torch.tensor([2.0, 1.0, 4.0, 50.0]))
    router.update()
    assert router.importance[5].item() == pytest.approx(0.9 * 10 + 0.1 * 3)
    assert router.importance[9].item() == pytest.approx(0.9 * 10 + 0.1 * 1)
    assert router.importance[6].item() == 10.0  # unseen ids keep their value
    router.observe(None, torch.tensor([5]), torch.tensor([0.0]))
    router.update()
    assert router.importance[5].item() == pytest.approx(0.9 * (0.9 * 10 + 0.1 * 3))
    assert router.importance[data.MASK] > 1e30 and router.importance[data.PAD] == float("-inf")


def test_frequency_router_keeps_rare_tokens():
    router = Router(data.VOCAB_SIZE, data.SPECIAL_IDS, data.PAD, data.CLS, kind="frequency")
    router.observe(torch.tensor([[3, 3, 3, 4]]), None, None)
    router.update()
    keep = router.select(torch.tensor([[data.CLS, 3, 4, 5]]), 3, torch.rand(1, 4))
    assert keep.tolist() == [[0, 2, 3]]


# ------------------------------------------------------------------------------------------------
# ScTD

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


def test_sctd_full_pass_exactly_every_interval(cache, tmp_path, monkeypatch):
    steps, full_passes = [], []
    forward, step_fn = Bert.forward, train.train_step

    def counting_forward(self, input_ids, mlm_positions, keep_idx=None):
        if self.training and keep_idx is None:
            full_passes.append(steps[-1])
        return forward(self, input_ids, mlm_positions, keep_idx)

    def recording_step(model, router, opt, scaler, batches, cfg, step, autocast):
        steps.append(step)
        return step_fn(model, router, opt, scaler, batches, cfg, step, autocast)

    monkeypatch.setattr(Bert, "forward", counting_forward)
    monkeypatch.setattr(train, "train_step", recording_step)
    log = run_train(tmp_path, cache, "--mode", "sctd", "--steps", 20, "--eval_every", 100)
    assert steps == list(range(20)) and full_passes == [0, 10]
    assert [r["step"] for r in log if r["mode"] == "sctd"] == [0, 10]
    assert all("kl_local" in r for r in log if r["mode"] == "sctd")
    assert all(r["mode"] == "drop" for r in log if r["step"] not in (0, 10))


def test_drop_path_compiles_and_matches_eager(cache):
    model = tiny_model(n_layer=4)
    b = real_batch(cache)
    router = Router(data.VOCAB_SIZE, data.SPECIAL_IDS, data.PAD, data.CLS)
    keep_idx = router.select(b.input_ids, 32, b.noise)
    compiled = torch.compile(model)
    with torch.no_grad():
        eager = model(b.input_ids, b.mlm_positions, keep_idx)
        fast = compiled(b.input_ids, b.mlm_positions, keep_idx)
    for a, c in zip(eager, fast):
        assert (a - c).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------
# Training runs

def test_tiny_model_learns(cache, tmp_path):
    log = run_train(tmp_path, cache, "--steps", 60, "--eval_every", 20, "--batch_size", 8)
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert val[0] > val[1] > val[2] and val[-1] < 9.5, val  # from ln(50304) = 10.8 at the start
    assert all(r["tokens_per_s"] > 0 for r in log)


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


# ------------------------------------------------------------------------------------------------
# Bad input: one line, naming the flag, non-zero exit

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
    (["--resume", "--out_dir", "/nonexistent/out"], "--resume"),
]


@pytest.mark.parametrize("args,flag", BAD_TRAIN_INPUT)
def test_bad_train_input(args, flag, cache, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--size", "tiny", "--data", CORPUS, "--cache_dir", cache, *args])
    err = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and one_line_error(err, flag), err


def test_empty_corpus_and_offline_hub(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    code, err = run_cli("train.py", "--size", "tiny", "--data", str(empty), "--cache_dir", str(tmp_path))
    assert code != 0 and one_line_error(err, "--data"), err
    code, err = run_cli("train.py", "--size", "tiny", "--data", "nobody/no-such-dataset", "--cache_dir", str(tmp_path),
                        env=dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert code != 0 and one_line_error(err, "offline", "--data"), err
