"""
Text in, batches out: the tokenizer, corpus preparation (text -> token files, once) and the
pretraining batches (packed rows, dynamic masking on the training device).

Tokenizer: tiktoken's gpt2 BPE (ids 0..50256, 50256 = <|endoftext|>, our end-of-document token)
plus four ids appended after it: [PAD] 50257, [CLS] 50258, [SEP] 50259, [MASK] 50260. The
embedding table is padded to 50304 rows (a multiple of 64); ids above 50260 never occur.
"""
import codecs
import fcntl
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

EOT, PAD, CLS, SEP, MASK = 50256, 50257, 50258, 50259, 50260
SPECIAL_IDS = (EOT, PAD, CLS, SEP, MASK)
VOCAB_SIZE = 50304
MASK_PROB = 0.15
VAL_EVERY = 100  # local corpora: every 100th document (the 1st, 101st, ...) is held out for validation
DEFAULT_DATA, DEFAULT_CONFIG = "Salesforce/wikitext", "wikitext-103-raw-v1"
FORMAT = 1  # bump when the token files change meaning: old caches are then rebuilt
TEXT_EXTS = (".txt", ".jsonl")
ARCHIVE_EXTS = ("", ".xz", ".gz")


# tiktoken's two gpt2 files (MIT, OpenAI's GPT-2 release) ship in the repository, named as tiktoken's cache names
# them, so the tokenizer loads offline with nothing to download. TIKTOKEN_CACHE_DIR, if set, is used instead.
GPT2_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "tiktoken_cache")


def get_encoding():
    """The gpt2 BPE; fails in one sentence when it cannot be loaded."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", GPT2_CACHE)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise ValueError(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}) from TIKTOKEN_CACHE_DIR="
                         f"{os.environ['TIKTOKEN_CACHE_DIR']}; unset it to use the files in {GPT2_CACHE}") from None


GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"  # what tiktoken builds its gpt2 from


def transformers_tokenizer(max_len=512):
    """
    This tokenizer as a transformers one (for an exported model): gpt2's byte-level BPE from the files
    tiktoken reads (its cache), our four special tokens at their ids, and rows laid out as ours:
    [CLS] a [SEP], pairs [CLS] a [SEP] b [SEP] with token types 0 then 1. [MASK] takes the space
    before it, as a masked word took its space in pretraining ("Paris is the [MASK] of France").
    """
    from tiktoken.load import read_file_cached
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    get_encoding()  # offline without the cache: its one-line error
    vocab = json.loads(read_file_cached(GPT2_FILES + "encoder.json"))
    merges = [tuple(line.split()) for line in read_file_cached(GPT2_FILES + "vocab.bpe").decode().splitlines()[1:] if line]
    bpe = Tokenizer(models.BPE(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = {"[PAD]": PAD, "[CLS]": CLS, "[SEP]": SEP, "[MASK]": MASK}
    bpe.add_special_tokens([AddedToken(t, lstrip=t == "[MASK]", normalized=False) for t in specials])
    assert all(bpe.token_to_id(t) == i for t, i in specials.items()), "gpt2's vocabulary should end at <|endoftext|>"
    bpe.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=max_len, pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


# ---------------------------------------------------------------------------------------------
# Reading documents. A source yields (text, ends_document, progress) pieces, progress counting the
# bytes (local files) or rows (hub) consumed so far; a document longer than PIECE_CHARS arrives in
# several pieces so that memory stays bounded whatever the input. Empty documents are skipped.

PIECE_CHARS = 1 << 20


class _Counts:
    """What preparation met on the way: invalid UTF-8 bytes (replaced by U+FFFD) and empty documents."""
    invalid_utf8_bytes = 0
    empty_documents = 0

    @classmethod
    def replace(cls, err):
        cls.invalid_utf8_bytes += err.end - err.start
        return "\ufffd", err.end


codecs.register_error("count_replace", _Counts.replace)


def is_local_path(data):
    """A --data value is a local path if it exists or looks like one; otherwise a hub dataset name."""
    return os.path.exists(data) or data.startswith((".", "/", "~")) or \
        any(data.endswith(t + a) for t in TEXT_EXTS for a in ARCHIVE_EXTS)


def _source_files(path):
    if not os.path.exists(path):
        raise ValueError(f"--data {path} does not exist; give a .txt/.jsonl file (optionally .xz/.gz) or a folder of them")
    if os.path.isfile(path):
        return [path]
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if any(f.endswith(t + a) for t in TEXT_EXTS for a in ARCHIVE_EXTS))
    if not files:
        raise ValueError(f"--data {path} holds no .txt or .jsonl files (plain, .xz or .gz)")
    return files


def _pieces(text, progress):
    """A document as pieces of at most PIECE_CHARS characters."""
    if not text.strip():
        _Counts.empty_documents += 1
        return
    starts = range(0, len(text), PIECE_CHARS)
    for i in starts:
        yield text[i:i + PIECE_CHARS], i == starts[-1], progress


def local_documents(path):
    """.jsonl: one document per line (field "text"); .txt: documents separated by blank lines."""
    done = 0
    for f in _source_files(path):
        with open(f, "rb") as raw:
            stream = lzma.open(raw) if f.endswith(".xz") else gzip.open(raw) if f.endswith(".gz") else raw
            text = codecs.getreader("utf-8")(stream, errors="count_replace")
            if ".jsonl" in f:
                for lineno, line in enumerate(text, 1):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(f"{f} line {lineno} is not a JSON object with a \"text\" field")
                    yield from _pieces(doc, done + raw.tell())
            else:
                lines, size = [], 0
                for line in text:
                    if line.strip():
                        lines.append(line)
                        size += len(line)
                    if lines and (not line.strip() or size > PIECE_CHARS):
                        # a blank line ends the document; a full buffer only ends the piece
                        yield "".join(lines), not line.strip(), done + raw.tell()
                        lines, size = [], 0
                if lines:
                    yield "".join(lines), True, done + raw.tell()
        done += os.path.getsize(f)


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def _wikitext_articles(rows):
    """WikiText rows are single lines; an article starts at a top-level ' = Title = ' line."""
    article = []
    for row in rows:
        if _WIKITEXT_TITLE.match(row["text"].strip("\n")) and article:
            yield "".join(article)
            article = []
        article.append(row["text"])
    yield "".join(article)


def hub_splits(name, config):
    """{split: documents} of a Hugging Face dataset, streamed (imports `datasets` only here)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {name} is a Hugging Face dataset, which needs `pip install datasets`; "
                         f"or pass a local .txt/.jsonl file with --data PATH")
    try:
        splits = datasets.load_dataset(name, config, streaming=True)
    except Exception as e:
        raise ValueError(f"could not load {name} ({config}) from the Hugging Face hub ({type(e).__name__}); "
                         f"offline? pass a local .txt/.jsonl file with --data PATH")

    def documents(rows):
        texts = _wikitext_articles(rows) if "wikitext" in name else (row["text"] for row in rows)
        for i, text in enumerate(texts):
            yield from _pieces(text, i)

    return {split: documents(splits[split]) for split in ("train", "validation") if split in splits}


# ---------------------------------------------------------------------------------------------
# Preparation: tokenize once, write train.bin / val.bin (uint16) and meta.json into a cache folder.

def cache_folder(data, config, cache_dir, max_tokens):
    """One folder per source (path + size + mtime, or hub name + config) and token cap."""
    if is_local_path(data):
        key = [os.path.abspath(data)] + [(f, os.path.getsize(f), os.path.getmtime(f)) for f in _source_files(data)]
    else:
        key = [data, config]
    key = json.dumps([FORMAT, max_tokens] + key)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(data)))[:40]
    return os.path.join(cache_dir, f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")


def prepare(data, config=DEFAULT_CONFIG, cache_dir="data_cache", max_tokens=None):
    """Tokenizes a corpus unless its cache folder is complete; returns the folder."""
    folder = cache_folder(data, config, cache_dir, max_tokens)
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    os.makedirs(cache_dir, exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a run beside us preparing the same source: wait, then use its folder
        if not os.path.exists(os.path.join(folder, "meta.json")):
            _tokenize(data, config, folder, max_tokens)
    return folder


def _tokenize(data, config, folder, max_tokens):
    """prepare()'s work, under its lock: writes the folder through a temporary one."""
    enc = get_encoding()
    if is_local_path(data):
        total, unit = sum(os.path.getsize(f) for f in _source_files(data)), "B"
        jobs = [("train", local_documents(data))]
    else:
        splits = hub_splits(data, config)
        total, unit = None, "doc"
        jobs = [("train", splits["train"])] + ([("val", splits["validation"])] if "validation" in splits else [])
    holdout = len(jobs) == 1  # no validation split of its own: every VAL_EVERY-th document, from the 1st
    tmp = folder + ".tmp"  # an interrupted run leaves only this behind; the next one starts it again
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _Counts.invalid_utf8_bytes = _Counts.empty_documents = 0
    counts, n_docs = {"train": 0, "val": 0}, 0
    budget = max_tokens or sys.maxsize  # tokens per split
    files = {s: open(os.path.join(tmp, f"{s}.bin"), "wb") for s in counts}
    with tqdm(total=total, unit=unit, unit_scale=True, desc=f"tokenizing {data}") as bar:
        for name, docs in jobs:
            done = 0
            for chunk in _chunks(docs):
                encoded = enc.encode_ordinary_batch([text for text, _, _ in chunk], num_threads=os.cpu_count())
                for (_, last, progress), ids in zip(chunk, encoded):
                    split = ("val" if n_docs % VAL_EVERY == 0 else "train") if holdout else name
                    if last:  # <|endoftext|> between documents, not between pieces of one
                        ids.append(EOT)
                        n_docs += 1
                    ids = ids[:budget - counts[split]]  # the cap is exact, even inside a long document
                    np.asarray(ids, dtype=np.uint16).tofile(files[split])
                    counts[split] += len(ids)
                    bar.update(progress - done)
                    done = progress
                if counts[name] >= budget:
                    break
    for f in files.values():
        f.close()
    if counts["train"] == 0 or counts["val"] == 0:
        shutil.rmtree(tmp)
        raise ValueError(f"--data {data} gave {counts['train']} training and {counts['val']} validation tokens; "
                         f"it needs at least 2 non-empty documents (every {VAL_EVERY}th is held out for validation)")
    meta = dict(source=data, config=None if holdout else config, tokenizer="gpt2", format=FORMAT,
                train_tokens=counts["train"], val_tokens=counts["val"], documents=n_docs,
                empty_documents=_Counts.empty_documents, invalid_utf8_bytes=_Counts.invalid_utf8_bytes)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if _Counts.invalid_utf8_bytes or _Counts.empty_documents:
        print(f"note: {data}: {_Counts.invalid_utf8_bytes} invalid UTF-8 bytes replaced by U+FFFD, "
              f"{_Counts.empty_documents} empty documents skipped")
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)


def _chunks(docs, chars=1 << 22):
    """Groups pieces into ~4M-character chunks, the unit tokenized in parallel (tiktoken's threads)."""
    chunk, size = [], 0
    for item in docs:
        chunk.append(item)
        size += len(item[0])
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def load_tokens(folder, split):
    """The token stream of a split as a read-only memmap, checked against meta.json's length."""
    with open(os.path.join(folder, "meta.json")) as f:
        n = json.load(f)[f"{split}_tokens"]
    path = os.path.join(folder, f"{split}.bin")
    if not os.path.exists(path) or os.path.getsize(path) != 2 * n:
        raise ValueError(f"{path} does not hold the {n} tokens meta.json promises (truncated?); "
                         f"delete {folder} and run again to rebuild it")
    return np.memmap(path, dtype=np.uint16, mode="r")


# ---------------------------------------------------------------------------------------------
# Batches. Randomness (row order, masking, the router's tie-breaking) is a pure function of
# (seed, example index), so a batch is the same whatever the number of processes that share it.

def _hash32(x):
    """A 32-bit integer mix (two multiply-xorshift rounds); x: int64 tensor of values < 2**32."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def example_uniform(seed, example_ids, n, stream):
    """(B,) example indices -> (B, n) floats in [0, 1), the same for an example on any rank or device."""
    h = _hash32(torch.full_like(example_ids, (seed * 16 + stream) & 0xFFFFFFFF))
    h = _hash32(h ^ (example_ids & 0xFFFFFFFF))
    h = _hash32(h ^ (example_ids >> 32))
    h = _hash32(h[:, None] ^ torch.arange(n, device=example_ids.device))
    return (h >> 8).float() / (1 << 24)


def n_masked(seq_len, rate=MASK_PROB):
    """Masked positions per row: a static share (BERT: 15%) of the T-2 non-special positions of a packed row."""
    return int(rate * (seq_len - 2) + 0.5)


def mask_tokens(ids, example_ids, seed, rate=MASK_PROB):
    """
    Dynamic masking (BERT): rate (15%) of the non-special positions; 80% of those become [MASK], 10% a
    random token, 10% stay. ids: (B, T) -> (input_ids (B, T), positions (B, M), targets (B, M));
    targets are -100 where a row had fewer than M maskable positions.
    """
    B, T = ids.shape
    pick, action, random_token = (example_uniform(seed, example_ids, T, s) for s in range(3))
    special = ids >= EOT
    positions = torch.where(special, 2.0, pick).topk(n_masked(T, rate), dim=1, largest=False).indices.sort(dim=1).values
    original = ids.gather(1, positions)
    maskable = ~special.gather(1, positions)
    action, random_token = action.gather(1, positions), (random_token.gather(1, positions) * EOT).long()
    new = torch.where(action < 0.8, MASK, torch.where(action < 0.9, random_token, original))
    input_ids = ids.scatter(1, positions, torch.where(maskable, new, original))
    return input_ids, positions, torch.where(maskable, original, -100)


@dataclass
class Batch:
    input_ids: torch.Tensor      # (B, T) after masking, [CLS] first, [SEP] last
    mlm_positions: torch.Tensor  # (B, M) the masked positions, increasing
    mlm_targets: torch.Tensor    # (B, M) their original ids, -100 = no target
    noise: torch.Tensor          # (B, D, T) uniform draws the router breaks ties with (D: one per layerwise layer, else 1)


def shuffle_order(batch, seed):
    """
    The batch with each row's tokens between [CLS] and [SEP] in a random order, the masked positions
    and their targets carried along. A model that ignores word order (a bag of words, as MLM training
    is at first) scores the same on both; the loss gap is how much word order it has learned.
    """
    B, T = batch.input_ids.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.rand(B, T - 2, generator=g).argsort(dim=1) + 1,
                      torch.full((B, 1), T - 1)], dim=1).to(batch.input_ids.device)  # new position -> old
    where = perm.argsort(dim=1)  # old position -> new
    positions, order = where.gather(1, batch.mlm_positions).sort(dim=1)
    return Batch(batch.input_ids.gather(1, perm), positions, batch.mlm_targets.gather(1, order), batch.noise)


class Batches:
    """Rows of T tokens: [CLS] + T-2 tokens of the packed stream (across documents) + [SEP]."""

    def __init__(self, tokens, seq_len, seed, device, mask_rate=MASK_PROB, noise_draws=1):
        self.tokens, self.seq_len, self.seed, self.device, self.mask_rate = tokens, seq_len, seed, device, mask_rate
        self.noise_draws = noise_draws
        self.n_rows = len(tokens) // (seq_len - 2)
        self._order = (None, None)

    def _row_order(self, epoch):
        """The order of the rows in an epoch: a fresh permutation per epoch."""
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows))
        return self._order[1]

    def get(self, example_ids):
        """example_ids: (B,) global example indices (numpy int64) -> Batch on the device."""
        L = self.seq_len - 2
        rows = [self._row_order(int(e) // self.n_rows)[int(e) % self.n_rows] for e in example_ids]
        body = torch.from_numpy(np.stack([self.tokens[r * L:(r + 1) * L] for r in rows]).astype(np.int64))
        ids = torch.cat([torch.full((len(rows), 1), CLS), body, torch.full((len(rows), 1), SEP)], dim=1)
        ex = torch.from_numpy(np.asarray(example_ids, dtype=np.int64))
        if self.device.type == "cuda":
            ids, ex = ids.pin_memory().to(self.device, non_blocking=True), ex.to(self.device, non_blocking=True)
        input_ids, positions, targets = mask_tokens(ids, ex, self.seed, self.mask_rate)
        # the first draw is the same whatever the number of draws: a run's kept tokens do not depend on it
        noise = example_uniform(self.seed, ex, self.noise_draws * self.seq_len, stream=3)
        return Batch(input_ids, positions, targets, noise.view(len(rows), self.noise_draws, self.seq_len))
