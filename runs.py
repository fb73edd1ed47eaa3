"""
What finished train.py runs say, from the two small files each keeps (config.json, log.jsonl): the time each took to
reach a target validation loss, measured or modelled (its steps of each kind times bench.py's step times), its saving
against the full run of the same seed, each method's saving over the seeds and its lead over the next, seed by seed,
and a figure of the curves. bench.py --runs prints it:

    python bench.py --runs out/full out/drop --target_loss 7.0 6.5 --step_times step_times.json --plot curves.png
"""
import glob
import json
import math
import os
import sys
from dataclasses import fields

import numpy as np

import train
from finetune import summarize


def print_markdown(rows, cols):
    """rows (dicts) as a markdown table; cols: (heading, key, format) each, None printed as a dash."""
    print("| " + " | ".join(head for head, _, _ in cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join("-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in cols) + " |")


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


