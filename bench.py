"""
How much faster token dropping and ScTD train: times train.py's own training step (forward,
backward, AdamW) for full-sequence training, token dropping and ScTD, sets each speedup against
the one its FLOPs predict and, on GPUs, the achieved FLOP/s against the device's peak (MFU).

    python bench.py                  # GPU: base, seq 512, bf16, compiled; CPU: mini, seq 128, batch 16, fp32
    python bench.py --sizes mini small --seq_lens 128 512 --json bench.json
    python bench.py --compare hf     # + transformers.BertForMaskedLM at the same shape (pip install transformers)
    python bench.py --runs out/full out/drop --plot curves.png   # finished train.py runs: time to a target loss
                                                                 # (+ the scores of finetune.py --json DIR/finetune*.json)

The modes run interleaved, one step of each per round (in an order that rotates), so that a change
in the machine's load hits them alike; each row is the median step after the warm-up rounds (where
compilation happens), with the spread of the steps beside it.
The batches are random ids masked as in training: the speed of a step does not depend on the text.
"""
import argparse
import gc
import glob
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from dataclasses import fields

import numpy as np
import torch
from tqdm import tqdm

import train
from data import GPT2, Batch, example_uniform, mask_tokens, n_masked
from dropping import noise_draws
from finetune import summarize
from loss import IGNORE
from model import SIZES

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor datasheets), looked up by a part of the device name.
PEAK_TFLOPS = {"H100 80GB HBM3": 989, "H100 SXM": 989, "H100 PCIe": 756, "H200": 989, "A100": 312, "L40S": 362}
GPU_BATCHES = (64, 32, 16, 8)  # the default batch on a GPU: the largest of these that fits
BENCH_MODES = ("drop", "sctd", "layerwise")


def parse_args(argv=None):
    p = train.OneLineParser(description=__doc__)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), help="model sizes (default: base on GPU, mini on CPU)")
    p.add_argument("--seq_lens", nargs="+", type=int, help="tokens per row, 8..512 (default: 512 on GPU, 128 on CPU)")
    p.add_argument("--batch_size", type=int, help="rows per step (default: the largest of 64/32/16/8 that fits on GPU, 16 on CPU)")
    p.add_argument("--keep", type=float, nargs="+", default=[train.TrainConfig.keep],
                   help="token dropping: fractions of tokens kept, in (0, 1]; each gets a row per --modes (default: 0.5)")
    p.add_argument("--modes", nargs="+", choices=BENCH_MODES, default=["drop", "sctd"], help="the step kinds timed at each "
                   "--keep beside full: drop (Hou et al.'s layers), sctd (its step, the hybrid's average); layerwise: "
                   "random-LTD's layers, for drop and sctd")
    p.add_argument("--position", default=train.TrainConfig.position, choices=train.POSITIONS,
                   help="the model's position scheme, as train.py --position")
    p.add_argument("--norm", default=train.TrainConfig.norm, choices=train.NORMS, help="post- or pre-LN, as train.py --norm")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the models (default: on for CUDA, as in train.py)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode, at least 2 (their median and spread are reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (compilation happens here)")
    p.add_argument("--compare", choices=["hf"], help="hf: add transformers.BertForMaskedLM at the same shape as a peer row")
    p.add_argument("--profile", action="store_true", help="also run one step of each mode under torch.profiler and print "
                   "where its time goes (matmuls, attention, dropping's gathers, the router's sort, AdamW, ...)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--runs", nargs="+", help="instead of timing steps, compare finished train.py runs (their --out_dir): "
                   "the time each took to reach --target_loss, from log.jsonl")
    p.add_argument("--target_loss", type=float, nargs="+", help="--runs: the validation losses to time (default: the "
                   "highest of the runs' best, so that every run reaches it)")
    p.add_argument("--step_times", help="--runs: a bench.py --json file of the runs' shape: each run's modelled minutes to "
                   "each target (its steps of each kind times bench's median time of that kind), free of the run's clock")
    p.add_argument("--plot", help="--runs: also draw the loss against time and tokens, the order gap and drift against "
                   "tokens, into this image (pip install matplotlib)")
    return p.parse_args(argv)


def synthetic_batch(batch_size, seq_len, index, device, noise_draws):
    """Random ordinary gpt2 ids between [CLS] and [SEP], masked as in training: a Batch of (B, T) and (B, M) tensors."""
    ids = torch.randint(0, min(GPT2.special), (batch_size, seq_len), generator=torch.Generator().manual_seed(index))
    ids[:, 0], ids[:, -1] = GPT2.cls, GPT2.sep
    examples = torch.arange(index * batch_size, (index + 1) * batch_size)
    input_ids, positions, targets = mask_tokens(ids, examples, seed=0)
    noise = example_uniform(0, examples, noise_draws * seq_len, stream=3).view(batch_size, noise_draws, seq_len)
    return Batch(*(t.to(device) for t in (input_ids, positions, targets, noise)))


def our_step(cfg, device, autocast, batches):
    """(fn(round r), model): fn runs one train.train_step on batches[r]; a ScTD run's rounds are its ScTD steps (every Fi-th)."""
    model, router, opt, scaler = train.build(cfg, device, GPT2)
    fwd = torch.compile(model) if cfg.compile else model
    every = cfg.sctd_interval if cfg.mode == "sctd" else 1
    k = train.kept_now(cfg, 0)
    return lambda r: train.train_step(fwd, router, opt, scaler, [batches[r]], cfg, r * every, cfg.lr, k, autocast), model


def hf_step(cfg, device, autocast, batches):
    """(fn(round r), version): the peer, transformers.BertForMaskedLM with SDPA attention and our shape, dropout, dtype,
    compile and AdamW settings. It takes labels (B, T), so it computes the logits of all T positions."""
    import transformers
    shape = SIZES[cfg.size]
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=GPT2.size, hidden_size=shape["n_embd"], num_hidden_layers=shape["n_layer"],
        num_attention_heads=shape["n_head"], intermediate_size=4 * shape["n_embd"], max_position_embeddings=512,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, layer_norm_eps=1e-12,
        attn_implementation="sdpa")).to(device)
    opt, scaler = train.optimizer(hf, cfg, device)
    fwd = torch.compile(hf) if cfg.compile else hf
    labels = [torch.full_like(b.input_ids, IGNORE).scatter(1, b.mlm_positions, b.mlm_targets) for b in batches]

    def step(r):
        with autocast:
            loss = fwd(input_ids=batches[r].input_ids, labels=labels[r]).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step, transformers.__version__


def time_steps(steps, warmup, timed, device, desc):
    """steps: {name: fn(round)}. Returns {name: median seconds}, {name: interquartile range / median} and
    {name: the most bytes a step allocated on top of what was resident before it, None on CPU}."""
    cuda, names = device.type == "cuda", list(steps)
    seconds, peak = {name: [] for name in steps}, dict.fromkeys(steps)
    for r in tqdm(range(warmup + timed), desc=desc, leave=False):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no mode always follows the same one
            step = steps[name]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            step(r)
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:  # after the first step, AdamW's moments are part of what is resident
                seconds[name].append(time.perf_counter() - t0)
                if cuda:
                    peak[name] = max(peak[name] or 0, torch.cuda.max_memory_allocated() - resident)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    quartiles = {name: statistics.quantiles(s, n=4, method="inclusive") for name, s in seconds.items()}
    return median, {name: (q[2] - q[0]) / median[name] for name, q in quartiles.items()}, peak


# Kinds of work in a step, recognized by fragments of the op's (CPU) or kernel's (GPU) name; the first match counts.
OP_KINDS = [("attention", ("scaled_dot_product", "flash", "fmha", "attention")),
            ("matmul", ("mm", "gemm", "xmma", "cutlass", "matmul")),
            ("MLM softmax and loss", ("softmax", "nll_loss", "cross_entropy")),
            ("gather/scatter/index", ("gather", "scatter", "index")),
            ("sort/top-k (router)", ("sort", "topk", "radix")),
            ("AdamW and clipping", ("adam", "foreach", "vector_norm"))]
SYNCS = ("synchronize", "local_scalar_dense")  # a host that waits for the device: once per step is by design


def profile_step(step, device):
    """One call of step() under torch.profiler -> ({kind of work: ms}, the 5 costliest ops as (name, ms), host-device
    syncs). Self times of the device's kernels on a GPU, of the CPU's ops otherwise; each op in one kind of OP_KINDS."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step(0)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    ms = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 for e in events
          if not cuda or e.device_type == torch.autograd.DeviceType.CUDA}
    kinds = {name: 0.0 for name, _ in OP_KINDS} | {"other": 0.0}
    for name, t in ms.items():
        kind = next((k for k, fragments in OP_KINDS if any(f in name.lower() for f in fragments)), "other")
        kinds[kind] += t
    syncs = sum(e.count for e in events if any(f in e.key.lower() for f in SYNCS))
    return kinds, sorted(ms.items(), key=lambda kv: -kv[1])[:5], syncs


def print_profile(name, kinds, top, syncs, device):
    """profile_step's findings as a markdown table of the kinds of work and their share."""
    total, cuda = sum(kinds.values()), device.type == "cuda"
    print(f"\n{name}: {total:.1f} ms of {'kernel' if cuda else 'CPU op'} time in one step"
          + (f", {syncs} host-device syncs" if cuda else ""))
    print_markdown([dict(kind=k, ms=t, share=t / total) for k, t in kinds.items()],
                   [("kind of work", "kind", "{}"), ("ms", "ms", "{:.1f}"), ("share", "share", "{:.0%}")])
    print("costliest: " + ", ".join(f"{op} {t:.1f} ms" for op, t in top))


def peak_tflops(device, dtype):
    """The device's dense bf16/fp16 peak in TFLOP/s; None on CPU, in fp32, or for a device PEAK_TFLOPS lacks."""
    if device.type != "cuda" or dtype == "fp32":
        return None
    return next((tflops for part, tflops in PEAK_TFLOPS.items() if part in torch.cuda.get_device_name(device)), None)


def configs(args, run, size, seq_len, batch_size):
    """{step kind: TrainConfig} of one shape: full, and at each --keep those of --modes, checked as
    train.py checks its flags. The kinds are train.step_kind's, the names a run's log counts its steps by."""
    def config(mode, keep=1.0, layerwise=False):  # lr: any value, the speed does not depend on it
        cfg = train.TrainConfig(size=size, mode=mode, seq_len=seq_len, batch_size=batch_size, keep=keep,
                                layerwise=layerwise, position=args.position, norm=args.norm, dtype=run.dtype,
                                compile=run.compile, device=run.device, lr=1e-4, warmup=0)
        train.check(cfg)
        return cfg
    # Hou et al.'s dropping step, for sctd too (its hybrid averages the two); layerwise: the same in random-LTD's layers
    modes = [("drop", False)] * bool({"drop", "sctd"} & set(args.modes)) + [("sctd", False)] * ("sctd" in args.modes)
    if "layerwise" in args.modes:
        modes += [("drop", True)] + [("sctd", True)] * ("sctd" in args.modes)
    cfgs = [config("full")] + [config(mode, keep, layerwise) for keep in args.keep for mode, layerwise in modes]
    return {train.step_kind(cfg, train.kept_now(cfg, 0), cfg.mode == "sctd"): cfg for cfg in cfgs}


def shape_rows(args, run, size, seq_len, batch_size, device, autocast):
    """Times every step kind (and the peer) at one shape; returns the table's rows, one dict per kind."""
    cfgs = configs(args, run, size, seq_len, batch_size)
    draws = noise_draws(SIZES[size]["n_layer"], "layerwise" in args.modes)
    batches = [synthetic_batch(batch_size, seq_len, r, device, draws) for r in range(args.warmup + args.steps)]
    if run.compile:
        torch._dynamo.reset()  # a fresh compilation per shape, never a dynamic-shape graph left by the previous one
    steps, hf_version = {}, None
    for kind, cfg in cfgs.items():
        steps[kind], model = our_step(cfg, device, autocast, batches)
    if args.compare == "hf":
        steps["hf"], hf_version = hf_step(cfgs["full"], device, autocast, batches)
    seconds, spread, memory = time_steps(steps, args.warmup, args.steps, device, f"{size} T={seq_len} B={batch_size}")

    M, Fi = n_masked(seq_len), cfgs["full"].sctd_interval

    def step_flops(cfg):  # forward + backward (twice the forward's matmuls); ScTD's step adds a full pass
        k = train.kept_now(cfg, 0)
        return 3 * (model.forward_flops(batch_size, seq_len, M, k, cfg.layerwise) +
                    (cfg.mode == "sctd") * model.forward_flops(batch_size, seq_len, M))
    flops = {kind: step_flops(cfg) for kind, cfg in cfgs.items()}
    flops["hf"] = 3 * model.forward_flops(batch_size, seq_len, seq_len)  # the peer's MLM head runs at all T positions
    names = {}  # row name -> (mode, keep, step kind)
    for kind, cfg in cfgs.items():
        layers = " layerwise" * cfg.layerwise
        names[kind] = (("sctd_step" if cfg.mode == "sctd" else cfg.mode) + layers, None if cfg.mode == "full" else cfg.keep, kind)
        if cfg.mode == "sctd":  # ScTD's hybrid training: one ScTD step, then Fi-1 dropping steps; the ScTD step's memory peak
            drop, hybrid = kind.replace("sctd", "drop"), kind.replace("sctd", "sctd_hybrid")
            for d in (flops, seconds):
                d[hybrid] = (d[kind] + (Fi - 1) * d[drop]) / Fi
            memory[hybrid], spread[hybrid], names[hybrid] = memory[kind], None, ("sctd_hybrid" + layers, cfg.keep, None)
    names["hf"] = ("hf", None, None)
    peak = peak_tflops(device, run.dtype)
    rows = [dict(size=size, seq_len=seq_len, batch_size=batch_size, keep=keep, mode=mode, kind=kind,
                 ms_per_step=1e3 * seconds[name], spread=spread[name], tokens_per_s=batch_size * seq_len / seconds[name],
                 speedup=seconds["full"] / seconds[name], flops_speedup=flops["full"] / flops[name],
                 tflops=flops[name] / seconds[name] / 1e12, mfu=peak and flops[name] / seconds[name] / 1e12 / peak,
                 step_gb=memory[name] and memory[name] / 2**30)
            for name, (mode, keep, kind) in names.items() if name in seconds]
    print_table(rows, device, run.dtype, Fi, hf_version)
    if args.profile:
        for r in rows:
            if r["kind"] in steps:
                kinds, top, syncs = profile_step(steps[r["kind"]], device)
                print_profile(f"--size {size} --seq_len {seq_len}, {r['kind']}", kinds, top, syncs, device)
                r["profile_ms"] = kinds
    return rows


# (header, row key, format) of the table's columns
COLUMNS = [("mode", "mode", "{}"), ("keep", "keep", "{:g}"), ("ms/step", "ms_per_step", "{:.1f}"), ("IQR", "spread", "{:.0%}"),
           ("tokens/s", "tokens_per_s", "{:,.0f}"), ("speedup", "speedup", "{:.2f}x"),
           ("FLOPs predict", "flops_speedup", "{:.2f}x"), ("TFLOP/s", "tflops", "{:.3g}"), ("MFU", "mfu", "{:.1%}"),
           ("step GB", "step_gb", "{:.2f}")]


def print_markdown(rows, cols):
    """rows (dicts) as a markdown table; cols: (heading, key, format) each, None printed as a dash."""
    print("| " + " | ".join(head for head, _, _ in cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join("-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in cols) + " |")


def print_table(rows, device, dtype, Fi, hf_version):
    """One shape's rows as a markdown table, and the notes a reader needs to read it."""
    first, gpu = rows[0], device.type == "cuda"
    cols = COLUMNS if gpu else COLUMNS[:-2]  # MFU and memory: GPU only
    print(f"\n--size {first['size']} --seq_len {first['seq_len']} --batch_size {first['batch_size']}")
    print_markdown(rows, cols)
    print(f"IQR: the spread of the timed steps (interquartile range / median). "
          f"speedup: measured, over full; FLOPs predict: the same ratio of the matmul FLOPs each step executes. "
          f"sctd: the ScTD step, a dropped and a full pass; sctd_hybrid: the average step of ScTD's hybrid training (Fi={Fi}). "
          f"layerwise: random-LTD's schedule, each of layers 1..L-2 on its own kept tokens.")
    if gpu:
        print(f"MFU: against the dense {dtype} peak of the device" if first["mfu"] is not None else
              f"MFU: bench.py knows no dense {dtype} peak for {torch.cuda.get_device_name(device)} (PEAK_TFLOPS: bf16/fp16)")
        print("step GB: the peak a step allocates on top of the resident weights and AdamW moments")
    if hf_version:  # the peer's row is the last
        print(f"hf: transformers {hf_version} BertForMaskedLM; our full step runs {1 / rows[-1]['speedup']:.2f}x as fast "
              f"(with {1 / rows[-1]['flops_speedup']:.2f}x fewer FLOPs: it computes the vocabulary logits at all {first['seq_len']} "
              f"positions of a row, we only at the {n_masked(first['seq_len'])} masked ones)")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:  # Linux; the name of the CPU model
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    return f"{name}, torch threads: {torch.get_num_threads()}"


def benchmark(args):
    """Every --sizes x --seq_lens shape: prints a table for each and returns all the rows."""
    if args.steps < 2 or args.warmup < 0:
        raise ValueError(f"--steps {args.steps} must be at least 2 and --warmup {args.warmup} at least 0")
    run = train.TrainConfig(dtype=args.dtype, compile=args.compile)
    _, _, device, autocast = train.setup(run)  # the device, dtype and compile defaults of train.py
    gpu = device.type == "cuda"
    sizes, seq_lens = args.sizes or ["base" if gpu else "mini"], args.seq_lens or [512 if gpu else 128]
    batch_sizes = [args.batch_size] if args.batch_size is not None else GPU_BATCHES if gpu else [16]
    for size in sizes:
        for seq_len in seq_lens:
            configs(args, run, size, seq_len, batch_sizes[0])  # bad flags stop here, before any timing
    if args.compare == "hf" and importlib.util.find_spec("transformers") is None:
        raise ValueError("--compare hf needs transformers (optional, not in requirements.txt): pip install transformers")
    print(f"device: {device_name(device)} | torch {torch.__version__} | {run.dtype} | compile {'on' if run.compile else 'off'} "
          f"| --position {args.position} --norm {args.norm} | median of {args.steps} steps after {args.warmup} warm-up rounds")
    load = os.getloadavg()[0]
    if not gpu and load > 0.5:
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores: the CPU is shared, so timings are noisy"
              # torch's threads wait on each other at every op when another process holds one of their cores
              + ("; OMP_NUM_THREADS=<idle cores> is often faster" if torch.get_num_threads() > 1 else ""))
    rows = []
    for size in sizes:
        for seq_len in seq_lens:
            for b in batch_sizes:  # the largest first
                try:
                    rows += shape_rows(args, run, size, seq_len, b, device, autocast)
                    break
                except torch.cuda.OutOfMemoryError:
                    if b == batch_sizes[-1]:
                        raise ValueError(f"out of memory at --size {size} --seq_len {seq_len} --batch_size {b}; "
                                         f"pass a smaller --batch_size or --seq_lens") from None
                gc.collect()  # here, after the except block, whose traceback held the models
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name(device), torch=torch.__version__, dtype=run.dtype, compile=run.compile,
                           command=" ".join(sys.argv), rows=rows), f, indent=1)
    return rows


def read_run(folder):
    """A finished train.py run: its flags (config.json), its evaluations (log.jsonl), and the dev scores of the
    fine-tunings saved beside it (finetune.py --json FOLDER/finetune*.json): {"task metric": median over the seeds}.
    The two small files are all it needs, so a study can keep its runs without their checkpoints."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(folder, "log.jsonl")) as f:
            records = [json.loads(line) for line in f]
    except (OSError, ValueError) as e:
        raise ValueError(f"--runs {folder}: not a train.py run ({str(e).splitlines()[0][:80]})") from None
    kept = []
    for r in records:  # a resumed run's records replace all from the step it resumed at (a crash may have logged more)
        while kept and kept[-1]["step"] >= r["step"]:
            kept.pop()
        kept.append(r)
    evals = [r for r in kept if "val_loss" in r]
    if not evals:
        raise ValueError(f"--runs {folder}: log.jsonl has no evaluation yet")
    runs = {}  # per task, pooled over the files (more seeds may come later); a seed run twice: the later file's counts
    for path in sorted(glob.glob(os.path.join(folder, "finetune*.json"))):
        with open(path) as f:
            for task, result in json.load(f)["results"].items():
                runs.setdefault(task, {}).update({(r["lr"], r["seed"]): r for r in result["runs"]})
    scores = {}
    for task, by_seed in runs.items():
        metric, median = next(iter(summarize(list(by_seed.values()))["median"].items()))  # the first metric: the main one
        scores[f"{task} {metric}"] = median
    return dict(name=os.path.basename(os.path.normpath(folder)), config=config, evals=evals, scores=scores)


def reach(evals, target, key="train_time"):
    """The training seconds (or tokens, key="tokens") at which the validation loss first reached target, linear between
    evaluations; None if never."""
    for before, r in zip([None] + evals, evals):
        if r["val_loss"] <= target:
            if before is None:
                return r[key]
            frac = (before["val_loss"] - target) / (before["val_loss"] - r["val_loss"])
            return before[key] + frac * (r[key] - before[key])
    return None


TRAIN_DEFAULTS = {f.name: f.default for f in fields(train.TrainConfig)}


def train_config(config):
    """A run's config.json as train.py's TrainConfig (a flag an older run did not record takes its default)."""
    return train.TrainConfig(**{k: v for k, v in config.items() if k in TRAIN_DEFAULTS})


# The flags that say how a run was made, not what it trained, and its budget (the comparison's condition, a column of
# its own; the same hour is 60 minutes measured or 102.34 modelled): never a method's setting
NOT_METHOD = {"seed", "data", "data_config", "cache_dir", "max_tokens", "device", "dtype", "compile", "out_dir", "log_every",
              "eval_every", "eval_iters", "save_every", "resume", "eval_only", "max_bad_steps", "prepare_only", "export",
              "overwrite", "step_times", "time_budget", "steps"}
DROPPING = {"keep", "router", "importance_beta", "layerwise", "keep_ramp", "full_end", "random_share"}
SCTD = {"sctd_interval", "sctd_lambda"}


def method_settings(config):
    """A run's method: its config without the seed and the bookkeeping, nor the settings its mode does not use; a
    setting an older run did not record has train.py's default."""
    unused = NOT_METHOD | (DROPPING | SCTD if config["mode"] == "full" else SCTD if config["mode"] == "drop" else set())
    settings = {k: config.get(k, v) for k, v in TRAIN_DEFAULTS.items() if k not in unused}
    settings["tokenizer"] = settings["tokenizer"] or "gpt2"  # train.py records the one it used; before, gpt2 was the only one
    return settings


def method_labels(configs):
    """A label per run: its mode and router, and every other setting that varies between the runs' methods and is not
    train.py's default, e.g. "drop (random router, keep 0.25, layerwise)". Runs share a label only if they differ by
    seed (or bookkeeping) alone."""
    methods = [method_settings(c) for c in configs]
    keys = dict.fromkeys(k for m in methods for k in m if k not in ("mode", "router"))
    varies = [k for k in keys if len({str(m.get(k)) for m in methods}) > 1]
    labels = []
    for m in methods:
        shown = [k if m[k] is True else f"{k} {m[k]:g}" if isinstance(m[k], float) else f"{k} {m[k]}"
                 for k in varies if k in m and m[k] != TRAIN_DEFAULTS[k]]
        inner = ", ".join(([f"{m['router']} router"] if "router" in m else []) + shown)
        labels.append(m["mode"] + (f" ({inner})" if inner else ""))
    return labels


def steps_of_each_kind(config, record):
    """{step kind: steps} up to an evaluation: logged by train.py since it counts them, else (older runs of one kept
    count) what the mode implies: every step dropped, or ScTD's every Fi-th from step 0."""
    if "kinds" in record:
        return record["kinds"]
    cfg, done = train_config(config), record["step"] + 1
    k = train.kept_now(cfg, 0)
    sctd = -(-done // cfg.sctd_interval) if cfg.mode == "sctd" else 0
    return {kind: n for kind, n in [(train.step_kind(cfg, k, False), done - sctd), (train.step_kind(cfg, k, True), sctd)] if n}


def model_time(run, step_times_file):
    """Adds "model_time" to each evaluation of a run: the seconds bench.py's step times give its steps so far."""
    try:
        seconds = train.read_step_times(step_times_file, train_config(run["config"]))
    except ValueError as e:
        raise ValueError(f"--runs {run['name']}: {e}") from None
    for r in run["evals"]:
        r["model_time"] = sum(n * seconds[kind] for kind, n in steps_of_each_kind(run["config"], r).items())


def timed(run, key):
    """Whether a run's evaluations hold a clock at key: "train_time" is not a measured one in a run made on the modelled
    clock (train.py --step_times), whose measured columns stay empty."""
    return key != "train_time" or not run["config"].get("step_times")


def compare_runs(args):
    """
    --runs: one row per run (the last evaluation; per target loss, the minutes to reach it and the saving against the
    full run of the same seed, measured and, with --step_times, modelled), then each method's saving over the seeds:
    their mean and range, and the lead of each method over the next, seed by seed (modelled where there is a model).
    """
    runs = [read_run(folder) for folder in args.runs]
    for run, method in zip(runs, method_labels([run["config"] for run in runs])):
        run["method"] = method
        if args.step_times:
            model_time(run, args.step_times)
    targets = args.target_loss or [max(min(r["val_loss"] for r in run["evals"]) for run in runs)]
    full = {run["config"]["seed"]: run for run in runs if run["config"]["mode"] == "full"}
    clocks = [("", "train_time")] + [("modelled ", "model_time")] * bool(args.step_times)
    rows = []
    for run in runs:
        cfg, last = run["config"], run["evals"][-1]
        peer = full.get(cfg["seed"]) if cfg["mode"] != "full" else None
        row = dict(run=run["name"], method=run["method"], mode=cfg["mode"], seed=cfg["seed"],
                   budget_min=cfg.get("time_budget"), steps=last["step"] + 1, tokens_M=last["tokens"] / 1e6,
                   val_loss=last["val_loss"], order_gap=last["val_order_gap"], drift_kl_local=last.get("drift_kl_local"),
                   drift_kl_global=last.get("drift_kl_global"), drift_cos_global=last.get("drift_cos_global"))
        for clock, key in clocks:  # steps per second, and the same over the full run's
            row[f"{clock}steps/s"] = (last["step"] + 1) / last[key] if timed(run, key) else None
            peer_speed = peer and timed(peer, key) and (peer["evals"][-1]["step"] + 1) / peer["evals"][-1][key]
            row[f"{clock}steps/s vs full"] = row[f"{clock}steps/s"] / peer_speed if row[f"{clock}steps/s"] and peer_speed else None
        for target in targets:
            for clock, key in clocks:
                t = reach(run["evals"], target, key) if timed(run, key) else None
                t_full = reach(peer["evals"], target, key) if peer and timed(peer, key) else None
                row[f"{clock}min to {target:.3f}"] = None if t is None else t / 60
                row[f"{clock}saving at {target:.3f}"] = None if not (t and t_full) else 1 - t / t_full
            n, n_full = reach(run["evals"], target, "tokens"), peer and reach(peer["evals"], target, "tokens")
            row[f"tokens vs full at {target:.3f}"] = None if not (n and n_full) else n / n_full
        rows.append(row)
    tasks = sorted({key for run in runs for key in run["scores"]})
    for row, run in zip(rows, runs):
        row.update({key: run["scores"].get(key) for key in tasks})
    cols = [("run", "run", "{}"), ("method", "method", "{}"), ("seed", "seed", "{}"), ("budget (min)", "budget_min", "{:g}"),
            ("steps", "steps", "{}"), ("tokens", "tokens_M", "{:.2f}M")]
    cols += [(key, key, fmt) for clock, _ in clocks for key, fmt in [(f"{clock}steps/s", "{:.3f}"), (f"{clock}steps/s vs full", "{:.2f}x")]]
    cols += [("val loss", "val_loss", "{:.3f}"), ("order gap", "order_gap", "{:.3f}"),
             ("drift KL local", "drift_kl_local", "{:.2e}"), ("drift KL global", "drift_kl_global", "{:.2e}"),
             ("drift cos global", "drift_cos_global", "{:.4f}")]
    for target in targets:
        cols += [(f"{clock}{what} {target:.3f}",) * 2 + (fmt,) for clock, _ in clocks
                 for what, fmt in [("min to", "{:.1f}"), ("saving at", "{:+.0%}")]]
        cols.append((f"tokens vs full at {target:.3f}",) * 2 + ("{:.2f}x",))
    # a column no run fills is left out: runs on the modelled clock measured no minutes, full runs have no drift
    print_markdown(rows, [c for c in cols if any(row[c[1]] is not None for row in rows)]
                   + [(key, key, "{:.1f}") for key in tasks])
    print("val loss, order gap, drift: the last evaluation. min to X: training minutes (evaluations and compilation not "
          "counted) until the validation loss first reached X, linear between evaluations; saving at X: 1 - that time / "
          "the full run's of the same seed; tokens vs full at X: the tokens it took to reach X over the full run's (the cost "
          "per token, free of the machine's speed); steps/s vs full: the same ratio of steps per second, whose saving "
          "alone would be 1 - 1 / it." + (" modelled: the same from the run's steps of each kind times the median step "
          f"time of that kind in {args.step_times}, untouched by the clock the run had." if args.step_times else "")
          + (" Then the median dev score of each fine-tuning saved beside the run." if tasks else ""))
    summary = savings_over_seeds(rows, targets, [clock for clock, _ in clocks])
    for line in summary:
        print(f"{line['method']}, saving at {line['target']:.3f} over {line['seeds']} seeds"
              + "".join(f" ({m})" for m in line["missed"]) + ": "
              + "".join(f"{clock}mean {line[clock + 'mean']:+.0%}, range [{line[clock + 'min']:+.0%}, {line[clock + 'max']:+.0%}]"
                        + (f" ({line[clock + 'count']} seeds)" if line[clock + "count"] != line["seeds"] else "")
                        + f"; by its {clock}step speed alone: mean {line[clock + 'speed_saving']:+.0%}"
                        + ("" if line[clock + "promise_kept"] is None else f" (it keeps {line[clock + 'promise_kept']:.0%} of that)")
                        + "; " for clock, _ in clocks if line[clock + "count"])
              + f"tokens vs full: mean {line['tokens_ratio']:.2f}x, range [{line['tokens_min']:.2f}x, {line['tokens_max']:.2f}x]")
    leads = paired_leads(rows, targets, clocks[-1][0])
    for lead in leads:
        print(f"{lead['ahead']} ahead of {lead['behind']} at {lead['target']:.3f}, {clocks[-1][0]}saving seed by seed: "
              f"by {100 * lead['mean']:+.0f} points, range [{100 * lead['min']:+.0f}, {100 * lead['max']:+.0f}]; ahead at "
              f"{lead['wins']} of {lead['seeds']} seeds (sign test, one-sided: p = {lead['sign_p']:.3f})")
    if args.plot:
        plot_runs(runs, targets[0], args.plot, "model_time" if args.step_times else "train_time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(target_loss=targets, command=" ".join(sys.argv), rows=rows, savings=summary, leads=leads), f, indent=1)
    return rows


def savings_over_seeds(rows, targets, clocks):
    """Per method (not full) and target: the savings of its seeds (each against its own full run; on each clock, "" for
    the measured, "modelled " for --step_times) and the tokens each needed against its full run's, their mean and range,
    over the seeds where both runs reached the target; the others are named, with which run missed it."""
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows if r["mode"] != "full"):
        mine = [r for r in rows if r["method"] == method]
        for target in targets:
            reached = [r for r in mine if r[f"tokens vs full at {target:.3f}"] is not None]
            if not reached:
                continue
            tokens = [r[f"tokens vs full at {target:.3f}"] for r in reached]
            # the seeds left out say so: a run that never reached the target would otherwise raise the mean
            missed = [f"seed {r['seed']}" + (" never reached it" if all(r[f"{c}min to {target:.3f}"] is None for c in clocks)
                                             else ": no full run of its seed reached it") for r in mine if r not in reached]
            line = dict(method=method, target=target, seeds=len(reached), missed=missed, tokens_ratio=float(np.mean(tokens)),
                        tokens_min=min(tokens), tokens_max=max(tokens))
            for clock in clocks:  # a clock some runs lack (measured minutes of modelled-clock runs) counts the others
                savings = [r[f"{clock}saving at {target:.3f}"] for r in reached if r[f"{clock}saving at {target:.3f}"] is not None]
                speed = [1 - 1 / r[f"{clock}steps/s vs full"] for r in mine if r[f"{clock}steps/s vs full"]]
                line[clock + "count"] = len(savings)
                if savings:
                    mean, promise = float(np.mean(savings)), float(np.mean(speed))
                    line.update({clock + "mean": mean, clock + "min": min(savings), clock + "max": max(savings),
                                 clock + "speed_saving": promise, clock + "promise_kept": mean / promise if promise > 0 else None})
            summary.append(line)
    return summary


def paired_leads(rows, targets, clock):
    """
    Whether one method's lead over another is larger than the seeds' spread. Per target, the methods ranked by their
    mean saving on clock ("" measured, "modelled "), each against the next below it, on the seeds both have (the one
    ahead is the one those seeds favour: means over different seeds can rank the other first): the difference of their
    savings seed by seed (its mean and range), at how many seeds the one ahead wins, and a one-sided sign test's p (the
    chance of winning at least that many if neither method were better). One seed ranks nothing: only pairs with two
    seeds or more.
    """
    leads = []
    for target in targets:
        key, savings = f"{clock}saving at {target:.3f}", {}
        for r in rows:
            if r["mode"] != "full" and r[key] is not None:
                savings.setdefault(r["method"], {})[r["seed"]] = r[key]
        ranked = sorted(savings, key=lambda m: -np.mean(list(savings[m].values())))
        for ahead, behind in zip(ranked, ranked[1:]):
            diffs = [savings[ahead][s] - savings[behind][s] for s in sorted(savings[ahead].keys() & savings[behind].keys())]
            if len(diffs) < 2:
                continue
            if np.mean(diffs) < 0:  # ranked by means over different seeds, but the seeds they share put the other ahead
                ahead, behind, diffs = behind, ahead, [-d for d in diffs]
            n, wins = len(diffs), sum(d > 0 for d in diffs)
            leads.append(dict(target=target, ahead=ahead, behind=behind, seeds=n, mean=float(np.mean(diffs)),
                              min=min(diffs), max=max(diffs), wins=wins,
                              sign_p=sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n))
    return leads


def legend_labels(runs):
    """One legend entry per method, on its first run: the method and its seed, or how many seeds it has (the tables
    tell the seeds apart; five seeds' line styles would not); None for its other runs."""
    seeds = {}
    for run in runs:
        seeds.setdefault(run["method"], []).append(run["config"]["seed"])
    labels = []
    for run in runs:
        its = seeds.pop(run["method"], None)  # None once its method has its entry
        labels.append(its and (f"{run['method']}, seed {its[0]}" if len(its) == 1 else f"{run['method']}, {len(its)} seeds"))
    return labels


def plot_runs(runs, target, path, clock):
    """Validation loss against training minutes (clock: "train_time" measured, "model_time" modelled) and tokens; order
    gap and semantic drift against tokens. A line per run."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib (optional, not in requirements.txt): pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = {}
    panels = [(0, 0, clock, "val_loss"), (0, 1, "tokens", "val_loss"), (1, 0, "tokens", "val_order_gap"),
              (1, 1, "tokens", "drift_kl_global")]
    for run, label in zip(runs, legend_labels(runs)):  # a color per method, its seeds' lines alike
        style = dict(label=label, marker=".", markersize=3, linewidth=1,
                     color=colors.setdefault(run["method"], f"C{len(colors)}"))
        for i, j, x, y in panels:
            if not timed(run, x):
                continue
            points = [(r[x] / (1e6 if x == "tokens" else 60), r[y]) for r in run["evals"] if y in r]
            if points:
                axes[i, j].plot(*zip(*points), **style)
    names = dict(train_time="training minutes (no evaluations or compilation)",
                 model_time="modelled minutes (steps x bench.py's step times)", tokens="training tokens (millions)",
                 val_loss="validation MLM loss", val_order_gap="order gap (shuffled rows' loss - loss)",
                 drift_kl_global="drift: KL of [CLS], dropped vs full pass")
    for i, j, x, y in panels:
        ax = axes[i, j]
        if y == "val_loss":
            ax.axhline(target, color="gray", linewidth=0.8, linestyle=":", label=f"target {target:.3f}")
        if y == "drift_kl_global":
            ax.set_yscale("log")
        ax.set_xlabel(names[x])
        ax.set_ylabel(names[y])
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None):
    args = parse_args(argv)
    try:
        compare_runs(args) if args.runs else benchmark(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
