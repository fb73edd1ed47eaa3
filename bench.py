"""
How much faster token dropping and ScTD train: times train.py's own training step (forward,
backward, AdamW) for full-sequence training, token dropping and ScTD, sets each speedup against
the one its FLOPs predict and, on GPUs, the achieved FLOP/s against the device's peak (MFU).

    python bench.py                  # GPU: base, seq 512, bf16, compiled; CPU: mini, seq 128, batch 16, fp32
    python bench.py --sizes mini small --seq_lens 128 512 --json bench.json
    python bench.py --compare hf     # + transformers.BertForMaskedLM at the same shape (pip install transformers)
    python bench.py --runs out/full out/drop --plot curves.png   # finished train.py runs (runs.py): time to a target
                                                                 # loss (+ the scores of finetune.py --json DIR/finetune*.json)

The modes run interleaved, one step of each per round (in an order that rotates), so that a change
in the machine's load hits them alike; each row is the median step after the warm-up rounds (where
compilation happens), with the spread of the steps beside it.
The batches are random ids masked as in training: the speed of a step does not depend on the text.
"""
import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

import train
from data import GPT2, Batch, example_uniform, mask_tokens, n_masked
from dropping import noise_draws
from loss import IGNORE
from model import SIZES
from runs import compare_runs, print_markdown

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


def main(argv=None):
    args = parse_args(argv)
    try:
        compare_runs(args) if args.runs else benchmark(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
