"""
Pretrain BERT with masked LM: full-sequence, token dropping (Hou et al. 2022) or ScTD (Zhong et al. 2023).

    python train.py --size base                                   # one GPU, or the CPU
    torchrun --nproc_per_node 8 train.py --size base --mode sctd  # data parallel (DDP)

Every flag is a field of TrainConfig below (python train.py --help lists them with their meaning).
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (DEFAULT_CONFIG, DEFAULT_DATA, MASK_PROB, Batches, cache_folder, is_local_path, load_tokenizer,
                  load_tokens, n_masked, own_tokenizer, prepare, saved_tokenizer, shuffle_order)
from dropping import ROUTERS, Router, kept_count, noise_draws, scheduled_count
from loss import mlm_loss, sctd_loss, semantic_drift
from model import (NORMS, POSITIONS, SIZES, Bert, BertConfig, adamw, from_transformers, shape, size_name,
                   to_transformers)

MODES = ("full", "drop", "sctd")
VAL_SEED = 0  # validation batches (and their masking) are the same for every run and mode


def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    size: str = arg("base", f"model size: {', '.join(SIZES)}, or any L<layers>-H<hidden>-A<heads> (Turc et al.'s "
                    "naming, e.g. L6-H512-A8)")
    mode: str = arg("full", "full: every layer sees every token; drop: token dropping; "
                    "sctd: token dropping plus a full pass and [CLS] alignment every --sctd_interval steps", choices=MODES)
    data: str = arg(DEFAULT_DATA, "a .txt (blank-line separated documents) or .jsonl (field \"text\") "
                    "file or folder, plain/.xz/.gz; or a Hugging Face dataset name")
    data_config: str = arg(None, f"configuration of a Hugging Face dataset (default: {DEFAULT_CONFIG} for the default "
                           "--data); a local file has none")
    tokenizer: str = arg(None, "gpt2 (tiktoken's BPE), or a Hugging Face fast tokenizer (a tokenizer.json, a folder, a "
                         "hub name such as bert-base-uncased) whose special tokens give [CLS] [SEP] [MASK] [PAD]. Default: "
                         "--init_from's own, else gpt2; --resume, --eval_only and --export use the checkpoint's")
    cache_dir: str = arg("data_cache", "where prepared token files are kept (one folder per source)")
    max_tokens: int = arg(None, "stop preparing after this many training tokens (default: all)")
    seq_len: int = arg(128, "tokens per row, [CLS] and [SEP] included (8..512)")
    mask_rate: float = arg(MASK_PROB, "share of each row's tokens masked for the training loss (BERT: 0.15); "
                           "validation always masks 0.15, so losses compare across rates")
    batch_size: int = arg(None, "rows per micro-batch per process (default: 256 / world size)")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    steps: int = arg(1_000_000, "optimizer steps (BERT: 1M at batch 256)")
    time_budget: float = arg(None, "minutes of training (evaluations, checkpoints and compilation not counted) after "
                             "which the run ends; the lr then decays to 0 over that time instead of over --steps, which "
                             "becomes a cap. For comparing modes at equal time; needs --warmup")
    lr: float = arg(None, "peak learning rate (default by size: 1e-4 for base/large, 5e-4 small/medium, 1e-3 tiny/mini)")
    warmup: int = arg(None, "linear warm-up steps, then linear decay to 0 at --steps "
                      "(default: 10%% of --steps, at most 10,000 as in BERT)")
    weight_decay: float = arg(0.01, "AdamW weight decay (none on LayerNorm weights and biases)")
    betas: tuple = arg((0.9, 0.98), "AdamW betas", nargs=2, type=float)
    eps: float = arg(1e-6, "AdamW epsilon")
    clip: float = arg(1.0, "gradient norm clipping (0: off)")
    position: str = arg(BertConfig.position, "how the model knows word order: rotary (RoFormer) or alibi (relative, in attention), "
                        "or absolute (learned embeddings: the paper's BERT, slower to leave the bag-of-words plateau)",
                        choices=POSITIONS)
    norm: str = arg(BertConfig.norm, "post: LayerNorm after each residual (BERT); pre: before each sublayer, plus a final one",
                    choices=NORMS)
    dropout: float = arg(BertConfig.dropout, "dropout probability while pretraining (BERT: 0.1; 0 learns faster on budgets "
                         "that see each token about once: docs/recipe.md; finetune.py uses its own)")
    keep: float = arg(0.5, "token dropping: fraction of tokens the middle layers keep, in (0, 1]")
    router: str = arg("loss", "which tokens are kept: loss (Hou et al.), random or frequency (ablations)", choices=ROUTERS)
    layerwise: bool = arg(False, "random-LTD's layer schedule (Yao et al. 2022): every layer but the first and the last "
                          "runs on its own draw of --keep of the tokens (use --router random)", action="store_true")
    keep_ramp: float = arg(0.0, "the kept share grows linearly from --keep to 1 over this fraction of the budget (of "
                           "--time_budget, else of --steps), in steps of 16 tokens, as random-LTD's schedule; 0: fixed")
    full_end: float = arg(0.0, "the last fraction of the budget trains full-sequence steps; 0: none")
    random_share: float = arg(0.0, "share of the kept tokens drawn at random among the ordinary tokens, the rest chosen "
                              "by --router (top-k plus random picks, as TF Model Garden's routing layer offers); 0: none")
    importance_beta: float = arg(0.995, "moving-average factor of the loss router's importance table")
    sctd_interval: int = arg(10, "ScTD: a full pass and the semantic constraints every Fi steps")
    sctd_lambda: float = arg(0.05, "ScTD: weight of the local + global KL constraints")
    dtype: str = arg("auto", "auto: bf16 on GPUs that have it, else fp16 (with loss scaling); fp32 on CPU",
                     choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = arg(None, "torch.compile the model (default: on for CUDA)", action=argparse.BooleanOptionalAction)
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    step_times: str = arg(None, "a bench.py --json file: the training clock (--time_budget, the lr, --keep_ramp, "
                          "train_time in the log) then advances by the median time bench measured for each step's kind "
                          "instead of the measured seconds, so equal-time runs do not depend on the machine's load")
    seed: int = arg(1337, "seed of the initial weights, row order, masking and tie-breaking")
    out_dir: str = arg("out", "where log.jsonl and checkpoints go")
    log_every: int = arg(10, "steps between lines of log.jsonl")
    eval_every: int = arg(1000, "steps between validations (and at the end)")
    eval_iters: int = arg(20, "validation batches per evaluation")
    save_every: int = arg(1000, "steps between checkpoints (and at the end)")
    resume: bool = arg(False, "continue from the checkpoint in --out_dir", action="store_true")
    eval_only: bool = arg(False, "load the checkpoint in --out_dir, print its validation metrics as JSON and exit",
                          action="store_true")
    max_bad_steps: int = arg(10, "stop after this many non-finite steps in a row")
    prepare_only: bool = arg(False, "tokenize --data into --cache_dir and exit (e.g. once, before a multi-node run)",
                             action="store_true")
    init_from: str = arg(None, "start from a transformers masked LM (a folder --export wrote, a BertForMaskedLM folder or "
                         "hub name such as bert-base-uncased, of any shape) instead of random weights: continued "
                         "pretraining, with the model's own tokenizer unless --tokenizer says otherwise")
    export: str = arg(None, "write the checkpoint in --out_dir to this folder as a transformers model and tokenizer "
                      "(AutoModelForMaskedLM/AutoTokenizer.from_pretrained read it) and exit")
    overwrite: bool = arg(False, "--export into a folder that is not empty", action="store_true")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each flag's default after its help (unless None or told there)."""

    def _get_help_string(self, action):
        shown = action.default in (None, False, argparse.SUPPRESS) or "default" in action.help
        return action.help if shown else action.help + " (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line naming the flag, like every other bad input (no usage dump)."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    for f in fields(TrainConfig):
        kw = dict(f.metadata)
        if "action" not in kw:
            kw.setdefault("type", f.type)  # the field's annotation: str, int or float (betas says float itself)
        p.add_argument(f"--{f.name}", default=f.default, **kw)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    cfg.betas = tuple(cfg.betas)
    return cfg


def check(cfg):
    """Bad input stops here, in one sentence naming the flag."""
    M, n_layer = n_masked(cfg.seq_len, cfg.mask_rate), shape(cfg.size)["n_layer"]
    rules = [
        (8 <= cfg.seq_len <= 512, f"--seq_len {cfg.seq_len} is outside 8..512 (the model has 512 positions)"),
        (M >= 1 and cfg.mask_rate < 1, f"--mask_rate {cfg.mask_rate} masks {M} of a row's {cfg.seq_len - 2} tokens; "
                                       "use a share in (0, 1) that masks at least one"),
        (cfg.batch_size is None or cfg.batch_size >= 1, f"--batch_size {cfg.batch_size} must be at least 1"),
        (cfg.grad_accum >= 1 and cfg.steps >= 1, "--grad_accum and --steps must be at least 1"),
        (0 < cfg.keep <= 1, f"--keep {cfg.keep} is outside (0, 1]"),
        (0 <= cfg.keep_ramp <= 1 and 0 <= cfg.full_end < 1 and 0 <= cfg.random_share < 1,
         f"--keep_ramp {cfg.keep_ramp} must be in [0, 1], --full_end {cfg.full_end} and --random_share {cfg.random_share} in [0, 1)"),
        (cfg.sctd_interval >= 1, f"--sctd_interval {cfg.sctd_interval} must be at least 1"),
        (not cfg.layerwise or n_layer >= 3,
         f"--layerwise drops in the layers between the first and the last, which --size {cfg.size} does not have"),
        (cfg.time_budget is None or cfg.time_budget > 0, f"--time_budget {cfg.time_budget} must be positive"),
        (cfg.data_config is None or not is_local_path(cfg.data),
         f"--data_config {cfg.data_config} names a Hugging Face dataset's configuration; --data {cfg.data} is a local path"),
        (cfg.time_budget is None or cfg.warmup is not None,
         "--time_budget needs --warmup (in steps: its default, 10% of --steps, has no meaning in a run that ends on time)"),
    ]
    if cfg.mode != "full" and 0 < cfg.keep <= 1 and 0 <= cfg.random_share < 1:
        k, need = kept_count(cfg.keep, cfg.seq_len), M + 2
        n_random = int(cfg.random_share * k)
        rules.append((k - n_random >= need,
                      f"--keep {cfg.keep} keeps {k} of {cfg.seq_len} tokens, {n_random} of them at random "
                      f"(--random_share), leaving fewer than the {need} always kept ([CLS], [SEP] and {M} masked); "
                      f"use a larger --keep or a smaller --random_share"))
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


def lr_at(step, cfg, clock=None):
    """Linear warm-up to cfg.lr over cfg.warmup steps, then linear decay to 0: at cfg.steps, or under --time_budget at
    that many minutes of training (clock: seconds trained, and when warm-up ended)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.time_budget:
        budget = 60 * cfg.time_budget
        return cfg.lr * max(0.0, (budget - clock["train_time"]) / max(1e-9, budget - clock["warmup_end"]))
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup))


def budget_used(cfg, step, clock):
    """How far through its budget a run is, in [0, 1]: in time under --time_budget, else in steps (the lr's clock)."""
    return clock["train_time"] / (60 * cfg.time_budget) if cfg.time_budget else step / cfg.steps


def kept_now(cfg, used):
    """Tokens per row the dropped layers keep with `used` of the budget gone (--keep, --keep_ramp, --full_end);
    None: a full-sequence step."""
    if cfg.mode == "full":
        return None
    k = scheduled_count(used, cfg.keep, cfg.seq_len, cfg.keep_ramp, cfg.full_end)
    return None if k >= cfg.seq_len else k


def step_kind(cfg, k, sctd_step):
    """What a step costs depends on this alone: "full", "drop k=64", "sctd k=64 layerwise", ... (bench.py's rows too)."""
    if k is None:
        return "full"
    return f"{'sctd' if sctd_step else 'drop'} k={k}" + (" layerwise" if cfg.layerwise else "")


def read_step_times(path, cfg):
    """--step_times: {step kind: median seconds} from a bench.py --json file, at this run's size, seq_len and batch."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--step_times {path}: not a bench.py --json file ({str(e).splitlines()[0][:80]})") from None
    times = {r["kind"]: r["ms_per_step"] / 1e3 for r in rows if r.get("kind") and
             (r["size"], r["seq_len"], r["batch_size"]) == (cfg.size, cfg.seq_len, cfg.batch_size)}
    counts = {kept_now(cfg, used) for used in np.linspace(0, 1, 1001)}  # every kept count the schedule passes
    kinds = {step_kind(cfg, k, sctd) for k in counts for sctd in {False, cfg.mode == "sctd"}}
    missing = sorted(kinds - set(times))
    if missing:
        raise ValueError(f"--step_times {path} has no time for {', '.join(missing)} at --size {cfg.size} --seq_len "
                         f"{cfg.seq_len} --batch_size {cfg.batch_size}; time them with bench.py --json (--keep, --modes)")
    return times


def is_sctd_step(cfg, step):
    """ScTD's hybrid training: the full pass and the semantic constraints every Fi-th step."""
    return cfg.mode == "sctd" and step % cfg.sctd_interval == 0


def objective(model, router, batch, cfg, sctd_step, k):
    """
    The loss of one micro-batch with k kept tokens per row (None: full sequence). Returns (loss, stats,
    token_losses); token_losses (B*M,) come from the dropped pass (or the only pass) and teach the router.
    """
    if k is None:
        logits, _, _ = model(batch.input_ids, batch.mlm_positions)
        loss, token_losses = mlm_loss(logits, batch.mlm_targets)
        return loss, {}, token_losses
    keep_idx = router.kept_positions(batch.input_ids, batch.noise, k)
    logits, *drop = model(batch.input_ids, batch.mlm_positions, keep_idx)
    mlm_drop, token_losses = mlm_loss(logits, batch.mlm_targets)
    if not sctd_step:
        return mlm_drop, {}, token_losses
    logits, *full = model(batch.input_ids, batch.mlm_positions)  # same weights, its own dropout masks
    mlm_full, _ = mlm_loss(logits, batch.mlm_targets)
    loss, kl_local, kl_global = sctd_loss(mlm_drop, mlm_full, full, drop, cfg.sctd_lambda)
    return loss, dict(mlm_drop=mlm_drop, mlm_full=mlm_full, kl_local=kl_local, kl_global=kl_global), token_losses


def train_step(model, router, opt, scaler, batches, cfg, step, lr, k, autocast):
    """
    One optimizer step at learning rate lr over the micro-batches (forward, backward, clip, AdamW, router update),
    with k kept tokens per row (None: full sequence). model: the module to call (compiled and/or DDP-wrapped).
    Returns a dict of floats, the step's kind, and "skipped": True when the gradient was not finite and nothing was updated.
    """
    sctd_step = is_sctd_step(cfg, step) and k is not None
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    totals = {}
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # all-reduce the gradients once, on the last micro-batch
        with (ddp.no_sync() if isinstance(ddp, DDP) and not last else nullcontext()):
            with autocast:
                loss, stats, token_losses = objective(model, router, batch, cfg, sctd_step, k)
            scaler.scale(loss / len(batches)).backward()
        if k is not None:
            router.observe(batch.input_ids, batch.mlm_targets.flatten(), token_losses.detach())
        for name, value in dict(loss=loss, **stats).items():
            totals[name] = totals.get(name, 0) + value.detach() / len(batches)
    for group in opt.param_groups:
        group["lr"] = lr
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
    logged = torch.stack(list(totals.values()))
    if dist.is_initialized():  # log the global batch's loss, not this rank's share
        dist.all_reduce(logged)
        logged /= dist.get_world_size()
    out = dict(zip(totals, logged.tolist()))  # one device sync per step
    finite = math.isfinite(norm.item())  # gradients are all-reduced: every rank agrees
    if finite or scaler.is_enabled():
        scaler.step(opt)  # fp16: the GradScaler itself skips a non-finite step
        scaler.update()
    opt.zero_grad(set_to_none=True)
    if finite and k is not None:
        router.update()
    else:
        router.reset()  # a non-finite loss must not reach the importance table either
    mode = "sctd" if sctd_step else "full" if k is None else "drop"
    return dict(out, skipped=not finite, mode=mode, kind=step_kind(cfg, k, sctd_step))


@torch.no_grad()
def evaluate(model, router, val_batches, cfg, autocast):
    """Full-sequence MLM loss and accuracy on fixed batches; the order gap (the loss on the same rows with their words
    shuffled, minus the loss: ~0 while the model is still a bag of words); for drop/sctd also the semantic drift."""
    model.eval()
    sums = {}
    for i, batch in enumerate(val_batches):
        with autocast:
            logits, *full = model(batch.input_ids, batch.mlm_positions)
            loss, _ = mlm_loss(logits, batch.mlm_targets)
            valid = batch.mlm_targets >= 0
            shuffled = shuffle_order(batch, seed=i)
            gap = mlm_loss(model(shuffled.input_ids, shuffled.mlm_positions)[0], shuffled.mlm_targets)[0] - loss
            result = dict(val_loss=loss.item(), val_order_gap=gap.item(),
                          val_acc=(logits.argmax(-1) == batch.mlm_targets)[valid].float().mean().item())
            if cfg.mode != "full":
                keep_idx = router.kept_positions(batch.input_ids, batch.noise, kept_count(cfg.keep, cfg.seq_len))
                _, *drop = model(batch.input_ids, batch.mlm_positions, keep_idx)
                result.update({f"drift_{k}": v for k, v in semantic_drift(full, drop).items()})
        for k, v in result.items():
            sums[k] = sums.get(k, 0.0) + v / len(val_batches)
    model.train()
    return sums


def save_checkpoint(out_dir, state):
    """Atomic: write a temp file, keep the previous checkpoint as ckpt_prev.pt, rename into ckpt.pt."""
    path, tmp = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "ckpt.pt.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, os.path.join(out_dir, "ckpt_prev.pt"))
    os.replace(tmp, path)


def load_checkpoint(out_dir, master=True, flag="--resume"):
    """The newest checkpoint that loads. A damaged one is named, set aside as *.bad (by rank 0, so that the next save
    does not rotate it over the good previous one) and passed over for the previous."""
    problems = []
    for name in ("ckpt.pt", "ckpt_prev.pt"):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not {"model", "step", "config"} <= set(state):
                raise ValueError("not a train.py checkpoint")
            return state
        except Exception as e:
            problems.append(f"{path} is unreadable ({str(e).splitlines()[0][:80]})")
            aside = f"; set aside as {name}.bad" if master else ""
            print(f"warning: {problems[-1]}{aside}, trying the previous checkpoint", file=sys.stderr)
            if master:
                os.replace(path, path + ".bad")
    raise ValueError(f"{flag}: " + ("; ".join(problems) if problems else
                     f"no checkpoint in {out_dir}; train there first, or pass the right --out_dir"))


class Stop:
    """SIGINT/SIGTERM: finish the current step, save, and exit 0."""
    requested = False

    @classmethod
    def install(cls):
        cls.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(cls, "requested", True))


def agree(flag, world, device):
    """Whether the flag is set on any rank (a signal, time up): all ranks must stop after the same step."""
    if world == 1:
        return flag
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def setup(cfg):
    """Process group (under torchrun), device, dtype. Returns (rank, world, device, autocast); resolves cfg.dtype."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.device == "auto":
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.dtype == "auto":
        cfg.dtype = "fp32" if device.type == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if cfg.compile is None:
        cfg.compile = device.type == "cuda"
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[cfg.dtype]
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    return rank, world, device, autocast


def follow(cfg, arch, source):
    """--resume/--eval_only/--init_from: the architecture is the source's, whatever the flags say (a note names what differs)."""
    saved = dict(size=size_name(arch), position=arch.position, norm=arch.norm)
    differ = [f"--{k} {v}" for k, v in saved.items() if v != getattr(cfg, k)]
    if differ:
        print(f"note: following {source}: {' '.join(differ)}", file=sys.stderr)
    for k, v in saved.items():
        setattr(cfg, k, v)


def export(cfg):
    """--export: the checkpoint in --out_dir -> a transformers folder (model + tokenizer); nothing is written on bad input."""
    if os.path.isdir(cfg.export) and os.listdir(cfg.export) and not cfg.overwrite:
        raise ValueError(f"--export {cfg.export} exists and is not empty; pass --overwrite to write into it")
    state = load_checkpoint(cfg.out_dir, master=False, flag="--export")
    tok = saved_tokenizer(cfg.out_dir, state["config"].get("tokenizer"))
    model = Bert(BertConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    hf = to_transformers(model, pad_token_id=tok.vocab.pad)
    hf.save_pretrained(cfg.export)
    tok.transformers(model.cfg.max_position).save_pretrained(cfg.export)
    print(f"wrote {cfg.export}: {type(hf).__name__} of the step-{state['step']} checkpoint in {cfg.out_dir}, and its tokenizer")


def build(cfg, device, vocab, arch=None):
    """The model (of arch, else of the flags), router, optimizer and loss scaler a config asks for."""
    torch.manual_seed(cfg.seed)
    arch = arch or BertConfig(**shape(cfg.size), vocab_size=vocab.size, dropout=cfg.dropout, position=cfg.position, norm=cfg.norm)
    model = Bert(arch).to(device)
    router = Router(model.cfg.vocab_size, vocab.special, vocab.pad, vocab.cls, cfg.router, cfg.importance_beta,
                    layerwise=cfg.layerwise, random_share=cfg.random_share).to(device)
    return (model, router, *optimizer(model, cfg, device))


def optimizer(model, cfg, device):
    """AdamW and the fp16 loss scaler (bench.py's peer uses them too)."""
    opt = adamw(model.parameters(), cfg.weight_decay, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return opt, torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")


def example_ids(step, micro, cfg, rank, world):
    """Global indices of this rank's examples: a step covers grad_accum * world * batch_size examples."""
    start = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
    return np.arange(start, start + cfg.batch_size)


def starting_point(cfg, master):
    """(checkpoint state, transformers model, tokenizer, architecture): the checkpoint of --resume/--eval_only or the
    model of --init_from, whose architecture and tokenizer the run then follows, or random weights (None, None, the
    --tokenizer, None: the flags' architecture). Runs before any data work, so bad input is an error at once."""
    state = init = arch = None
    if cfg.resume or cfg.eval_only:
        state = load_checkpoint(cfg.out_dir, master, "--eval_only" if cfg.eval_only else "--resume")
        recorded = state["config"].get("tokenizer") or "gpt2"  # checkpoints from before --tokenizer are gpt2's
        if cfg.tokenizer not in (None, recorded) and master:
            print(f"note: following the checkpoint in {cfg.out_dir}: --tokenizer {recorded}", file=sys.stderr)
        tok, arch = saved_tokenizer(cfg.out_dir, recorded), BertConfig(**state["model_config"])
        source = f"the checkpoint in {cfg.out_dir}"
    elif cfg.init_from:
        try:
            init = from_transformers(cfg.init_from)
        except ValueError as e:
            raise ValueError(f"--init_from: {e}") from None
        tok, arch = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else own_tokenizer(
            cfg.init_from, "--init_from", "pass --tokenizer, the one the model was trained with"), init.cfg
        source = f"--init_from {cfg.init_from}"
        if tok.vocab.n_ids > arch.vocab_size:
            raise ValueError(f"the tokenizer {tok.name} has {tok.vocab.n_ids} ids, more than the {arch.vocab_size} rows "
                             f"of {source}'s embedding; pass the model's own --tokenizer")
    else:
        tok = load_tokenizer(cfg.tokenizer or "gpt2")
    cfg.tokenizer = tok.name
    if arch is not None:
        follow(cfg, arch, source)
        arch = replace(arch, dropout=cfg.dropout)  # the weights' shape is the source's; dropout is this run's
    return state, init, tok, arch


def fill_defaults(cfg, world):
    """The defaults that depend on the number of processes, the steps, the size (BERT's where it has one) or the data."""
    cfg.batch_size = cfg.batch_size or max(1, 256 // world)
    if cfg.data == DEFAULT_DATA:
        cfg.data_config = cfg.data_config or DEFAULT_CONFIG
    cfg.warmup = min(10_000, cfg.steps // 10) if cfg.warmup is None else cfg.warmup
    cfg.lr = cfg.lr or {"base": 1e-4, "large": 1e-4, "small": 5e-4, "medium": 5e-4}.get(cfg.size, 1e-3)


def load_data(cfg, folder, world, device, vocab):
    """The prepared corpus -> (training Batches, the fixed validation batches: the same in every run and mode)."""
    draws = noise_draws(shape(cfg.size)["n_layer"], cfg.layerwise)
    train_data = Batches(load_tokens(folder, "train"), cfg.seq_len, cfg.seed, device, cfg.mask_rate, draws, vocab)
    val_data = Batches(load_tokens(folder, "val"), cfg.seq_len, VAL_SEED, device, noise_draws=draws, vocab=vocab)
    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    if train_data.n_rows < rows_per_step or val_data.n_rows < 1:
        raise ValueError(f"--data {cfg.data} has {train_data.n_rows} training rows of {cfg.seq_len} tokens, fewer than "
                         f"one step's {rows_per_step} (or no validation row); use more text or a smaller --batch_size/--seq_len")
    return train_data, [val_data.get(np.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size)) for i in range(cfg.eval_iters)]


def restore(state, model, router, opt, scaler, rank, device):
    """Puts a checkpoint back (weights, importance table, optimizer, loss scaler, this rank's RNG). Returns (step, clock)."""
    model.load_state_dict(state["model"])
    router.load_state_dict(state["router"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"][rank % len(state["rng"])]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return state["step"], state["clock"]


def save(cfg, step, model, router, opt, scaler, clock, world, device):
    """Every rank hands in its RNG state (dropout's generator); rank 0 writes the checkpoint."""
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_checkpoint(cfg.out_dir, dict(model=model.state_dict(), router=router.state_dict(), optimizer=opt.state_dict(),
                                          scaler=scaler.state_dict(), step=step, config=asdict(cfg),
                                          model_config=asdict(model.cfg), rng=rngs, clock=clock))


def progress_bar(cfg, step, clock, budget, master):
    """Steps done of --steps; under --time_budget, seconds trained of the budget."""
    if budget is None:
        return tqdm(total=cfg.steps, initial=step, disable=not master, dynamic_ncols=True)
    return tqdm(total=budget, initial=min(clock["train_time"], budget), unit="s", disable=not master, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")


def train(cfg):
    check(cfg)
    if cfg.export:
        return export(cfg)
    rank, world, device, autocast = setup(cfg)
    master = rank == 0
    state, init, tok, arch = starting_point(cfg, master)
    fill_defaults(cfg, world)
    step_times = read_step_times(cfg.step_times, cfg) if cfg.step_times else None
    if master:
        print(json.dumps(asdict(cfg), indent=1))
        prepare(cfg.data, cfg.data_config, cfg.cache_dir, cfg.max_tokens, tok)
    if world > 1:
        dist.barrier()  # the other ranks read what rank 0 prepared
    folder = cache_folder(cfg.data, cfg.data_config, cfg.cache_dir, cfg.max_tokens, tok)
    if cfg.prepare_only:
        print(f"prepared {folder}")
        return
    train_data, val_batches = load_data(cfg, folder, world, device, tok.vocab)

    model, router, opt, scaler = build(cfg, device, tok.vocab, arch)
    # seconds of training steps, when warm-up ended, and the steps of each kind so far (what bench.py models time from)
    step, clock = 0, dict(train_time=0.0, warmup_end=0.0, kinds={})
    if state is not None:
        step, clock = restore(state, model, router, opt, scaler, rank, device)
        clock.setdefault("kinds", {})  # a checkpoint from before the kinds were counted
        if master:
            print(f"resumed from step {step}" if cfg.resume else
                  json.dumps(dict(steps_done=step, **evaluate(model, router, val_batches, cfg, autocast))))
        if cfg.eval_only:
            return
    else:
        if init is not None:
            model.load_state_dict(init.state_dict())
        torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; the weights above do not
    fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    fwd = torch.compile(fwd) if cfg.compile else fwd

    os.makedirs(cfg.out_dir, exist_ok=True)
    if master:  # the run's flags beside its log: bench.py --runs reads the two, no checkpoint needed
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
        tok.save(cfg.out_dir)
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None
    Stop.install()
    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    budget = 60 * cfg.time_budget if cfg.time_budget else None
    bar = progress_bar(cfg, step, clock, budget, master)
    bad, compiled = 0, set()  # non-finite steps in a row; the step kinds run so far
    # a resumed run that has already used its time budget is done
    while step < cfg.steps and (budget is None or clock["train_time"] < budget):
        t0 = time.perf_counter()
        batches = [train_data.get(example_ids(step, i, cfg, rank, world)) for i in range(cfg.grad_accum)]
        lr = lr_at(step, cfg, clock)
        out = train_step(fwd, router, opt, scaler, batches, cfg, step, lr, kept_now(cfg, budget_used(cfg, step, clock)), autocast)
        seconds = time.perf_counter() - t0
        if step_times:  # the modelled clock: what bench.py measured for a step of this kind
            trained = step_times[out["kind"]]
        else:  # a kind's first step (again after --resume) is where torch.compile compiles its graphs: not training
            # time, and ScTD's two graphs would cost it more of an equal-time budget than full training's one
            trained = 0.0 if cfg.compile and out["kind"] not in compiled else seconds
        compiled.add(out["kind"])
        clock["train_time"] += trained
        clock["kinds"][out["kind"]] = clock["kinds"].get(out["kind"], 0) + 1
        if step + 1 == cfg.warmup:
            clock["warmup_end"] = clock["train_time"]
        bad = bad + 1 if out["skipped"] else 0
        if bad >= cfg.max_bad_steps:
            raise ValueError(f"{bad} non-finite steps in a row (last: step {step}); the last good checkpoint is in "
                             f"{cfg.out_dir}: lower --lr or raise --warmup, then --resume")
        done = step + 1
        # the ranks' clocks differ a little: all stop when the first runs out
        out_of_time = budget is not None and agree(clock["train_time"] >= budget, world, device)
        last = done == cfg.steps or out_of_time

        record = dict(step=step, loss=out["loss"], lr=lr, tokens_per_s=round(rows_per_step * cfg.seq_len / seconds),
                      mode=out["mode"], kind=out["kind"], train_time=round(clock["train_time"], 2), tokens=done * rows_per_step * cfg.seq_len)
        record.update({k: out[k] for k in ("kl_local", "kl_global", "mlm_drop", "mlm_full") if k in out})
        if out["skipped"]:
            record["skipped"] = True
        if master and (done % cfg.eval_every == 0 or last):
            record.update(evaluate(model, router, val_batches, cfg, autocast), kinds=dict(clock["kinds"]))
            bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if master and (step % cfg.log_every == 0 or "val_loss" in record or out["mode"] == "sctd" or out["skipped"]):
            log.write(json.dumps(record) + "\n")
            log.flush()
        bar.update(min(trained, bar.total - bar.n) if budget else 1)  # tqdm cannot draw a count past its total
        bar.set_postfix(step=done, loss=f"{out['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,}")

        stop = agree(Stop.requested, world, device)
        if done % cfg.save_every == 0 or last or stop:
            save(cfg, done, model, router, opt, scaler, clock, world, device)
        if master and (stop or out_of_time):
            print(f"stopped at step {done}" if stop else f"--time_budget {cfg.time_budget} minutes reached at step {done}",
                  f"checkpoint saved in {cfg.out_dir}", sep="; ")
        if stop or out_of_time:
            break
        step = done
    if master:
        log.close()
    if world > 1:
        if dist.get_backend() == "gloo":
            # Gloo frees a finished collective's tensors on its own thread, which needs the GIL: one still doing so
            # when Python exits aborts the process. So wait for rank 0's checkpoint with the GIL released, through
            # monitored_barrier: dist.barrier() would hold the last collective and free it as late as before.
            dist.monitored_barrier()
        dist.destroy_process_group()


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
