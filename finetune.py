"""
Fine-tune a checkpoint on GLUE and SuperGLUE tasks and report dev-set scores, with
BERT's fine-tuning recipe (Devlin et al. 2019).

    python finetune.py --ckpt out/ckpt.pt --task sst2,rte --data_dir testdata          # the fixtures: a smoke test
    python finetune.py --ckpt out/ckpt.pt --task glue,superglue --json scores.json      # all 14, from the hub
    python finetune.py --init random --size mini --task rte,cb --data_dir DIR           # the floor to clear

A token-dropping or ScTD checkpoint is a plain BERT here: fine-tuning always runs the full model.
Each (lr, seed) is one run; per task the table keeps the lr with the best median dev score and
shows the median of each metric over the seeds and its spread (min-max).
"""
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data import GPT2, load_tokenizer, own_tokenizer, saved_tokenizer
from model import SIZES, Bert, BertConfig, adamw, from_transformers
from train import OneLineParser

WEIGHT_DECAY = 0.01
HUB = {"glue": "nyu-mll/glue", "superglue": "aps/super_glue"}
TITLE = {"glue": "GLUE", "superglue": "SuperGLUE"}


# ---------------------------------------------------------------------------------------------
# Metrics, in plain numpy. pred, gold: (N,) arrays; scores in percent, as the benchmarks report them.

def accuracy(pred, gold):
    return 100 * float(np.mean(pred == gold))


def f1(pred, gold, positive=1):
    """F1 of one class, 2 TP / (2 TP + FP + FN); 0 where the class is neither predicted nor present."""
    tp = np.sum((pred == positive) & (gold == positive))
    wrong = np.sum((pred == positive) != (gold == positive))  # FP + FN
    return 100 * float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def macro_f1(pred, gold):
    """The unweighted mean of the per-class F1 (CB: three classes, one of them rare)."""
    return float(np.mean([f1(pred, gold, c) for c in np.union1d(pred, gold)]))


def mcc(pred, gold):
    """Matthews correlation of binary predictions (CoLA); 0 where a margin is empty."""
    tp, tn = np.sum((pred == 1) & (gold == 1)), np.sum((pred == 0) & (gold == 0))
    fp, fn = np.sum((pred == 1) & (gold == 0)), np.sum((pred == 0) & (gold == 1))
    denom = math.sqrt(float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn))
    return 100 * float(tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x, y):
    """Pearson's r; 0 where one side is constant (a collapsed regression head)."""
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return 100 * float((x * y).sum()) / denom if denom else 0.0


def ranks(x):
    """1-based ranks of x: (N,); tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    smaller = np.cumsum(counts) - counts  # how many values lie below each distinct value
    return (smaller + (counts + 1) / 2)[inverse]


def spearman(x, y):
    """Spearman's rho: Pearson's r of the ranks."""
    return pearson(ranks(x), ranks(y))


METRICS = dict(acc=accuracy, f1=f1, macro_f1=macro_f1, mcc=mcc, pearson=pearson, spearman=spearman)


# ---------------------------------------------------------------------------------------------
# Tasks. An example is ([(text a, text b or None), ...], label): one pair, or one per choice (COPA).

@dataclass
class Task:
    name: str               # the --task name
    bench: str              # "glue" (TSV files) or "superglue" (JSONL files)
    folder: str             # its folder in --data_dir, e.g. SST-2
    config: str             # its configuration on the hub
    fields: tuple           # (text a, text b or None, label): names in the local files
    labels: tuple = None    # label values in the hub's class order; None: regression (STS-B)
    metrics: tuple = ("acc",)
    hub_fields: tuple = None  # the same on the hub, where it names them differently
    header: tuple = None    # the columns of a TSV file without a header row (CoLA)
    dev: tuple = (("", "dev"),)  # (metric suffix, split): MNLI has a matched and a mismatched dev set
    pairs: object = None    # row -> [(a, b), ...] where the text is more than two fields
    choices: int = 1        # sequences per example, each scored alone: the highest scoring one wins

    @property
    def n_out(self):
        """Outputs of the head: one score (regression, or per choice), else one logit per class."""
        return 1 if self.labels is None or self.choices > 1 else len(self.labels)


def copa_pairs(row):
    """Premise and question, then each choice: the same premise can ask for a cause or an effect."""
    question = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
    return [(f"{row['premise']} {question}", row[choice]) for choice in ("choice1", "choice2")]


def wic_pairs(row):
    """The target word goes first: the two sentences alone do not say which word is asked about."""
    return [(f"{row['word']}: {row['sentence1']}", row["sentence2"])]


BINARY, TRUTH, ENTAIL = ("0", "1"), ("False", "True"), ("entailment", "not_entailment")
TASKS = {t.name: t for t in [
    Task("cola", "glue", "CoLA", "cola", ("sentence", None, "label"), BINARY, ("mcc",),
         header=("source", "label", "author_label", "sentence")),
    Task("sst2", "glue", "SST-2", "sst2", ("sentence", None, "label"), BINARY),
    Task("mrpc", "glue", "MRPC", "mrpc", ("#1 String", "#2 String", "Quality"), BINARY, ("f1", "acc"),
         hub_fields=("sentence1", "sentence2", "label")),
    Task("stsb", "glue", "STS-B", "stsb", ("sentence1", "sentence2", "score"), None, ("pearson", "spearman"),
         hub_fields=("sentence1", "sentence2", "label")),
    Task("qqp", "glue", "QQP", "qqp", ("question1", "question2", "is_duplicate"), BINARY, ("acc", "f1"),
         hub_fields=("question1", "question2", "label")),
    Task("mnli", "glue", "MNLI", "mnli", ("sentence1", "sentence2", "gold_label"),
         ("entailment", "neutral", "contradiction"), hub_fields=("premise", "hypothesis", "label"),
         dev=(("_m", "dev_matched"), ("_mm", "dev_mismatched"))),
    Task("qnli", "glue", "QNLI", "qnli", ("question", "sentence", "label"), ENTAIL),
    Task("rte", "glue", "RTE", "rte", ("sentence1", "sentence2", "label"), ENTAIL),
    Task("wnli", "glue", "WNLI", "wnli", ("sentence1", "sentence2", "label"), BINARY),
    Task("boolq", "superglue", "BoolQ", "boolq", ("question", "passage", "label"), TRUTH),
    Task("cb", "superglue", "CB", "cb", ("premise", "hypothesis", "label"),
         ("entailment", "contradiction", "neutral"), ("acc", "macro_f1")),
    Task("copa", "superglue", "COPA", "copa", (None, None, "label"), BINARY, pairs=copa_pairs, choices=2),
    Task("wic", "superglue", "WiC", "wic", (None, None, "label"), TRUTH, pairs=wic_pairs),
    Task("sg_rte", "superglue", "RTE", "rte", ("premise", "hypothesis", "label"), ENTAIL),
]}
BENCHMARKS = {bench: [t.name for t in TASKS.values() if t.bench == bench] for bench in HUB}


def local_path(task, data_dir, split):
    """--data_dir is a benchmark's folder (glue/) or the one holding glue/ and superglue/."""
    name = f"{split}.tsv" if task.bench == "glue" else f"{split.replace('dev', 'val')}.jsonl"
    for path in (os.path.join(data_dir, task.folder, name), os.path.join(data_dir, task.bench, task.folder, name)):
        if os.path.isfile(path):
            return path
    raise ValueError(f"--data_dir {data_dir} has no {task.folder}/{name} (nor {task.bench}/{task.folder}/{name}) "
                     f"for --task {task.name}; point it at the {TITLE[task.bench]} task folders, or drop that task")


def hub_rows(task, split):
    """A split from the Hugging Face hub; `datasets` is imported here only, when --data_dir is not given."""
    name = HUB[task.bench]
    try:
        import datasets
        return datasets.load_dataset(name, task.config, split=split.replace("dev", "validation"))
    except Exception as e:
        raise ValueError(f"could not load {name} ({task.config}, {split}) from the Hugging Face hub ({type(e).__name__}); "
                         f"offline? pass --data_dir with the {TITLE[task.bench]} task folders")


def read_split(task, data_dir, split):
    """One split as a list of examples ([(a, b), ...], label: class index, or a float for regression)."""
    if data_dir is None:
        rows, (a, b, y), where = hub_rows(task, split), task.hub_fields or task.fields, HUB[task.bench]
    else:
        where = local_path(task, data_dir, split)
        with open(where, encoding="utf-8-sig", newline="") as f:  # -sig: MRPC's header starts with a BOM
            if task.bench == "superglue":
                rows = [json.loads(line) for line in f if line.strip()]
            else:  # GLUE TSVs quote nothing: a '"' is part of the text
                rows = list(csv.DictReader(f, fieldnames=task.header, delimiter="\t", quoting=csv.QUOTE_NONE))
        a, b, y = task.fields
    examples = []
    for i, row in enumerate(rows):
        try:
            if None in row or None in row.values():  # csv's marks of a row longer or shorter than the header
                raise KeyError
            pairs = task.pairs(row) if task.pairs else [(row[a], row[b] if b else None)]
            if task.labels is None:
                label = float(row[y])
            elif data_dir is None:  # the hub's labels are class indices already
                label = row[y]
            else:
                label = task.labels.index(str(row[y]))
        except (KeyError, ValueError):
            raise ValueError(f"{where} ({split}) row {i + 1} is not {task.name} data: it needs the fields "
                             f"{[f for f in task.fields if f]} and a label in {task.labels or 'numbers'}")
        examples.append((pairs, label))
    return examples


def read_task(task, data_dir, max_train):
    """{split: examples} for train and the dev split(s); max_train: the same random subset for every run."""
    data = {split: read_split(task, data_dir, split) for split in ["train"] + [s for _, s in task.dev]}
    if max_train is not None and max_train < len(data["train"]):
        keep = np.random.default_rng(0).permutation(len(data["train"]))[:max_train]
        data["train"] = [data["train"][i] for i in sorted(keep)]
    return data


# ---------------------------------------------------------------------------------------------
# Tokens and batches

def encode_pair(a, b, max_len, vocab=GPT2):
    """
    The ids of a text a and of a text b (or None) -> [CLS] a [SEP] (b [SEP]) as (ids, token types), at most
    max_len tokens. Too long, the longer text loses its end first, and where both must lose, the shorter keeps
    half the room: transformers' "longest_first", so that the exported tokenizer truncates as we do.
    """
    room = max_len - (2 if b is None else 3)
    if b is None:
        a = a[:room]
    elif len(a) + len(b) > room:
        n_short = min(len(a), len(b), room // 2)
        a, b = (a[:n_short], b[:room - n_short]) if len(a) <= len(b) else (a[:room - n_short], b[:n_short])
    ids = [vocab.cls] + a + [vocab.sep] + ([] if b is None else b + [vocab.sep])
    return ids, [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)


def tokenize(tok, examples, max_len):
    """Examples -> ([(ids, token types) per pair], label), every text encoded in one batch (the tokenizer's threads)."""
    texts = [t for pairs, _ in examples for pair in pairs for t in pair if t is not None]
    ids = iter(tok.encode_batch(texts))
    return [([encode_pair(next(ids), None if b is None else next(ids), max_len, tok.vocab) for a, b in pairs], label)
            for pairs, label in examples]


def collate(examples, device, pad=GPT2.pad):
    """
    Tokenized examples -> input_ids, token_type_ids: (N, T) padded to the batch's longest row;
    attn_mask: (N, T) bool, True at real tokens; labels: (B,). N = B * choices: a choice task's
    rows are its examples' choices, in order.
    """
    seqs = [seq for seqs, _ in examples for seq in seqs]
    ids = torch.full((len(seqs), max(len(s) for s, _ in seqs)), pad)
    types = torch.zeros_like(ids)
    for i, (row, row_types) in enumerate(seqs):
        ids[i, :len(row)], types[i, :len(row)] = torch.tensor(row), torch.tensor(row_types)
    labels = torch.tensor([label for _, label in examples])
    return [t.to(device) for t in (ids, types, ids != pad, labels)]


def length_batches(examples, batch_size, rng=None):
    """
    Batches of example indices that pad little, since a batch pads to its longest row. Evaluation
    (no rng): all examples in length order. Training: a random order, sorted by length within
    windows of 50 batches, then the batches shuffled: random content, similar lengths (~2x faster).
    """
    lengths = np.array([max(len(ids) for ids, _ in seqs) for seqs, _ in examples])
    n = len(examples)
    order, window = (np.arange(n), n) if rng is None else (rng.permutation(n), 50 * batch_size)
    for start in range(0, n, window):
        part = order[start:start + window]
        order[start:start + window] = part[np.argsort(lengths[part], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# Model, training, evaluation

class Classifier(nn.Module):
    """BERT + a task head: dropout -> linear (BERT's) on [CLS]'s final state, or on the mean of the real
    tokens' (pool="mean"). Pretraining has no next-sentence objective, so there is no pretrained pooler
    to reuse, and no masked-LM loss reads [CLS]'s final state (only ScTD's constraints do)."""

    def __init__(self, bert, n_out, pool="cls", frozen=False):
        super().__init__()
        self.bert, self.pool, self.frozen = bert, pool, frozen
        self.drop = nn.Dropout(bert.cfg.dropout)
        self.head = nn.Linear(bert.cfg.n_embd, n_out)
        Bert._init_weights(self.head)
        bert.requires_grad_(not frozen)

    def train(self, mode=True):
        """A frozen encoder (a linear probe) always runs as at evaluation: the head learns fixed features."""
        super().train(mode)
        self.bert.train(mode and not self.frozen)
        return self

    def forward(self, input_ids, token_type_ids, attn_mask):
        """input_ids, token_type_ids, attn_mask: (N, T) -> (N, n_out)."""
        _, h = self.bert.encode(input_ids, token_type_ids, attn_mask)
        if self.pool == "mean":
            real = attn_mask[..., None].to(h.dtype)
            return self.head(self.drop((h * real).sum(1) / real.sum(1)))
        return self.head(self.drop(h[:, 0]))


def task_loss(task, out, labels):
    """out: (N, n_out), labels: (B,). MSE for regression; otherwise cross-entropy over the classes, or
    over an example's choices (a choice task's (B * choices, 1) scores viewed as (B, choices))."""
    if task.labels is None:
        return F.mse_loss(out.view(-1), labels)
    return F.cross_entropy(out.view(len(labels), -1), labels)


@torch.no_grad()
def evaluate(model, task, examples, batch_size, device, autocast, pad=GPT2.pad):
    """{metric: dev score} of the model's predictions on examples."""
    model.eval()
    pred = np.empty(len(examples))
    for idx in length_batches(examples, batch_size):
        *inputs, _ = collate([examples[j] for j in idx], device, pad)
        with autocast:
            out = model(*inputs).view(len(idx), -1).float()
        pred[idx] = (out[:, 0] if task.labels is None else out.argmax(-1)).cpu().numpy()
    gold = np.array([label for _, label in examples])
    model.train()
    return {m: METRICS[m](pred, gold) for m in task.metrics}


def lr_at(step, peak, steps, warmup):
    """BERT's fine-tuning schedule: linear warm-up to peak over warmup steps, then linear decay to 0 at steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (steps - step) / (steps - warmup)


def finetune(task, data, init, args, lr, seed):
    """One run: fine-tune on data["train"] from init's weights; returns {metric + dev suffix: score}."""
    torch.manual_seed(seed)  # the head, dropout, and with --init random the whole model
    bert = Bert(BertConfig(**dict(init.model_config, dropout=args.dropout)))  # pretraining's own may be 0
    if init.state is not None:
        bert.load_state_dict(init.state)
    model = Classifier(bert, task.n_out, args.pool, frozen=args.probe).to(args.device)
    opt = adamw([p for p in model.parameters() if p.requires_grad], WEIGHT_DECAY, lr=lr, eps=1e-6)  # --probe: the head alone
    train, bs = data["train"], args.batch_size
    steps = args.epochs * math.ceil(len(train) / bs)
    warmup = int(args.warmup * steps)
    rng, step = np.random.default_rng(seed), 0
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    for epoch in range(args.epochs):
        bar = tqdm(length_batches(train, bs, rng), desc=f"{task.name} lr {lr:g} seed {seed} epoch {epoch + 1}/{args.epochs}",
                   leave=False, dynamic_ncols=True)
        for idx in bar:
            *inputs, labels = collate([train[j] for j in idx], args.device, init.tok.vocab.pad)
            with autocast:
                loss = task_loss(task, model(*inputs).float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, steps, warmup)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if args.save_dir:  # the encoder alone, in train.py's format: --ckpt starts another fine-tuning from it
        torch.save(dict(model=model.bert.state_dict(), model_config=init.model_config, config=dict(tokenizer=init.tok.name),
                        finetuned=f"{task.name} lr {lr:g} seed {seed}, from {init.source}"),
                   os.path.join(args.save_dir, f"{task.name}_lr{lr:g}_seed{seed}.pt"))
    scores = {}
    for suffix, split in task.dev:
        scores.update({m + suffix: v for m, v in evaluate(model, task, data[split], 2 * bs, args.device, autocast,
                                                                  init.tok.vocab.pad).items()})
    return scores


def summarize(runs):
    """runs: [{lr, seed, scores}] -> the lr whose median dev score (mean of the task's metrics) over the
    seeds is best, with each metric's median and [min, max] over those seeds."""
    by_lr = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r["scores"])
    best = max(by_lr, key=lambda lr: np.median([np.mean(list(s.values())) for s in by_lr[lr]]))
    scores = by_lr[best]
    return dict(lr=best, seeds=len(scores), runs=runs,
                median={m: float(np.median([s[m] for s in scores])) for m in scores[0]},
                spread={m: [min(s[m] for s in scores), max(s[m] for s in scores)] for m in scores[0]})


def table(results):
    """Markdown: one row per task and metric."""
    lines = ["| task | metric | dev (median) | min, max | lr | seeds |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for m, v in r["median"].items():
            lo, hi = r["spread"][m]
            lines.append(f"| {name} | {m} | {v:.1f} | {lo:.1f}, {hi:.1f} | {r['lr']:g} | {r['seeds']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def load_init(args):
    """The weights to start from: SimpleNamespace(model_config, state: a state_dict or None = random, source, tok: the
    Tokenizer the weights were trained with)."""
    if args.ckpt is None:
        if args.init == "checkpoint":
            raise ValueError("--ckpt is missing; pass a checkpoint written by train.py (its --out_dir/ckpt.pt), "
                             "or --init random for the untrained baseline")
        arch = BertConfig(**SIZES[args.size])  # the default architecture at that size, as train.py builds it
        return SimpleNamespace(model_config=asdict(arch), state=None, tok=load_tokenizer("gpt2"),
                               source=f"random init, --size {args.size} --position {arch.position} --norm {arch.norm}")
    if os.path.isdir(args.ckpt):  # a transformers model (train.py --export wrote it, or it was trained there since)
        try:
            bert = from_transformers(args.ckpt)
        except ValueError as e:
            raise ValueError(f"--ckpt: {e}") from None
        tok = own_tokenizer(args.ckpt, "--ckpt", "save the model's tokenizer into it (train.py --export does)")
        ckpt = dict(model=bert.state_dict(), model_config=asdict(bert.cfg), config=dict(size="-", mode="-"), step="-")
    elif not os.path.isfile(args.ckpt):
        raise ValueError(f"--ckpt {args.ckpt} does not exist; pass a checkpoint written by train.py (its --out_dir/ckpt.pt)")
    else:
        try:
            ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"--ckpt {args.ckpt} is not a PyTorch checkpoint ({type(e).__name__}); pass one written by train.py")
    if not isinstance(ckpt, dict) or not {"model", "model_config"} <= set(ckpt):
        raise ValueError(f"--ckpt {args.ckpt} is not a train.py checkpoint (no \"model\" and \"model_config\" entries)")
    if os.path.isfile(args.ckpt):  # the tokenizer it records (finetune.py --save_dir's too)
        tok = saved_tokenizer(os.path.dirname(args.ckpt), ckpt.get("config", {}).get("tokenizer"))
    cfg = ckpt["model_config"]
    if tok.vocab.n_ids > cfg.get("vocab_size", 0):
        raise ValueError(f"--ckpt {args.ckpt} has a vocabulary of {cfg.get('vocab_size')} ids, fewer than the "
                         f"{tok.vocab.n_ids} of its tokenizer {tok.name}")
    try:
        Bert(BertConfig(**cfg)).load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"--ckpt {args.ckpt} does not fit model.Bert ({str(e).splitlines()[0][:100]})")
    trained = ckpt.get("config", {})
    history = (f"fine-tuned on {ckpt['finetuned']}" if "finetuned" in ckpt else  # finetune.py --save_dir wrote it
               f"step {ckpt.get('step')}, --size {trained.get('size')}, --mode {trained.get('mode')}")
    source = f"{args.ckpt} ({history})"
    if args.init == "random":
        return SimpleNamespace(model_config=cfg, state=None, tok=tok, source=f"random init, the architecture of {source}")
    return SimpleNamespace(model_config=cfg, state=ckpt["model"], tok=tok, source=source)


def task_names(spec):
    """--task: task names, glue, superglue, or a comma list of those -> task names, in order, once each."""
    names = []
    for name in spec.lower().split(","):
        names += BENCHMARKS.get(name.strip(), [name.strip()])
    for name in names:
        if name not in TASKS:
            raise ValueError(f"--task {name} is not a task; choose from {', '.join(TASKS)}, glue or superglue")
    return list(dict.fromkeys(names))


def comma_list(text, kind, flag):
    """'1e-4,5e-5' -> [0.0001, 5e-05]."""
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text} is not a comma list of {kind.__name__}s")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("--task", required=True, help=f"a task ({', '.join(TASKS)}), glue, superglue, or a comma list")
    p.add_argument("--ckpt", help="a checkpoint written by train.py (its --out_dir/ckpt.pt), or a transformers masked-LM "
                   "folder (train.py --export wrote it, or a BERT saved with its tokenizer); the tasks are tokenized with "
                   "the tokenizer it was trained with")
    p.add_argument("--init", default="checkpoint", choices=["checkpoint", "random"],
                   help="random: the same architecture from random weights, the floor a checkpoint must clear")
    p.add_argument("--size", default="mini", choices=list(SIZES), help="the architecture of --init random without --ckpt")
    p.add_argument("--data_dir", help="folder with the GLUE TSV / SuperGLUE JSONL task folders, or the one holding "
                   "glue/ and superglue/; default: download nyu-mll/glue and aps/super_glue with `datasets`")
    p.add_argument("--lr", default="2e-5", help="peak learning rate; a comma list sweeps and keeps the best per task")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    p.add_argument("--batch_size", type=int, default=32, help="examples per step")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps warming up linearly; then linear decay to 0")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout in the encoder and before the head (BERT's 0.1), whatever pretraining used")
    p.add_argument("--pool", default="cls", choices=["cls", "mean"],
                   help="the head reads [CLS]'s final state (BERT's), or the mean over the real tokens'")
    p.add_argument("--probe", action="store_true",
                   help="a linear probe: train the head alone on the frozen encoder's features (no dropout in it), "
                   "which measures what pretraining put in them before fine-tuning can change them")
    p.add_argument("--seeds", default="0", help="comma list of seeds (head, dropout, order; the weights with --init random)")
    p.add_argument("--max_train", type=int, help="fine-tune on a fixed random subset of this many training examples")
    p.add_argument("--max_len", type=int, default=128, help="tokens per sequence; longer pairs lose tokens from the longer text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPUs that have it, else fp32 (bf16 also runs on CPU)")
    p.add_argument("--save_dir", help="write each run's fine-tuned encoder (not its head) here, as TASK_lrLR_seedSEED.pt: "
                   "a checkpoint --ckpt takes, to fine-tune it on another task (an intermediate task, then the target)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def run(args):
    tasks = [TASKS[name] for name in task_names(args.task)]
    lrs, seeds = comma_list(args.lr, float, "--lr"), comma_list(args.seeds, int, "--seeds")
    init = load_init(args)
    positions = init.model_config.get("max_position", BertConfig.max_position)
    rules = [
        (8 <= args.max_len <= positions, f"--max_len {args.max_len} is outside 8..{positions} (the model's positions)"),
        (all(lr > 0 for lr in lrs), f"--lr {args.lr} must be positive"),
        (0 <= args.dropout < 1, f"--dropout {args.dropout} is a probability, in [0, 1)"),
        (args.epochs >= 1 and args.batch_size >= 1, "--epochs and --batch_size must be at least 1"),
        (0 <= args.warmup < 1, f"--warmup {args.warmup} is a fraction of the steps, in [0, 1)"),
        (args.max_train is None or args.max_train >= 1, f"--max_train {args.max_train} must be at least 1"),
        (args.data_dir is None or os.path.isdir(args.data_dir), f"--data_dir {args.data_dir} is not a folder; "
         f"give the folder of the GLUE/SuperGLUE task folders, or leave it out to download them"),
        (args.save_dir is None or not os.path.isfile(args.save_dir), f"--save_dir {args.save_dir} is a file, not a folder"),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        init.tok.save(args.save_dir)  # the checkpoints there record its name; the copy travels with them
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    print(json.dumps(vars(args), indent=1))
    print(f"init: {init.source}")
    data = {t.name: read_task(t, args.data_dir, args.max_train) for t in tasks}  # a missing file fails before training
    results = {}
    for task in tasks:
        tokens = {split: tokenize(init.tok, examples, args.max_len) for split, examples in data[task.name].items()}
        runs = []
        for lr in lrs:
            for seed in seeds:
                t0 = time.time()
                scores = finetune(task, tokens, init, args, lr, seed)
                print(f"{task.name} lr {lr:g} seed {seed}: " + ", ".join(f"{m} {v:.1f}" for m, v in scores.items()) +
                      f" ({time.time() - t0:.0f} s)", flush=True)
                runs.append(dict(lr=lr, seed=seed, scores=scores))
        results[task.name] = summarize(runs)
    print(f"\n{init.source}\n\n{table(results)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(init=init.source, config=vars(args), results=results), f, indent=1)
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
