"""
Text in, batches out: the tokenizer, corpus preparation (text -> token files, once) and the
pretraining batches (packed rows, dynamic masking on the training device).

Tokenizer (--tokenizer): by default tiktoken's gpt2 BPE (ids 0..50256, 50256 = <|endoftext|>, our
end-of-document token) plus four ids appended after it: [PAD] 50257, [CLS] 50258, [SEP] 50259,
[MASK] 50260; the embedding table is padded to 50304 rows (a multiple of 64). Or any Hugging Face
fast tokenizer (bert-base-uncased's WordPiece, RoBERTa's BPE, one trained on your corpus): its
special tokens give the same roles (Vocab), wherever they sit in its vocabulary.
"""
import codecs
import fcntl
import functools
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
import unicodedata
from dataclasses import dataclass, field, replace

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

MASK_PROB = 0.15
VAL_EVERY = 100  # local corpora: every 100th document (the 1st, 101st, ...) is held out for validation
DEFAULT_DATA, DEFAULT_CONFIG = "Salesforce/wikitext", "wikitext-103-raw-v1"
FORMAT = 1  # bump when the token files change meaning: old caches are then rebuilt
TEXT_EXTS = (".txt", ".jsonl")
ARCHIVE_EXTS = ("", ".xz", ".gz")


@dataclass(frozen=True)
class Vocab:
    """
    What the code needs to know of a tokenizer: how many ids it gives and which ids play the special roles.
    `special` ids are never masked nor drawn as a random replacement, and the router always keeps them but
    [PAD]. Packed rows separate documents with `eod`: the tokenizer's end-of-document token, else its [SEP].
    """
    n_ids: int
    pad: int
    cls: int
    sep: int
    mask: int
    eod: int
    special: tuple

    @property
    def size(self):
        """Rows of the model's embedding table: n_ids padded to a multiple of 64 (faster matmuls)."""
        return -(-self.n_ids // 64) * 64


GPT2 = Vocab(n_ids=50261, pad=50257, cls=50258, sep=50259, mask=50260, eod=50256, special=tuple(range(50256, 50261)))
GPT2_SPECIAL_TOKENS = ["<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]


@functools.lru_cache(maxsize=8)
def id_tables(vocab, device):
    """(is_special: (size,) bool, ordinary: the ids that are not special, increasing) on a device."""
    is_special = torch.zeros(vocab.size, dtype=torch.bool)
    is_special[list(vocab.special)] = True
    is_special[vocab.n_ids:] = True  # the padding rows: never in the data, never a replacement
    return is_special.to(device), (~is_special).nonzero().flatten().to(device)


@dataclass(frozen=True)
class Tokenizer:
    """
    name: "gpt2" or the Hugging Face tokenizer's source (a tokenizer.json, a folder, a hub name), as a
    checkpoint records it; encode_batch: texts -> their ids, no special tokens added; hf: the transformers
    tokenizer (None for gpt2), which a checkpoint's folder keeps a copy of and --export saves.
    """
    name: str
    vocab: Vocab
    encode_batch: object = field(compare=False)
    hf: object = field(default=None, compare=False)

    def fingerprint(self):
        """What the token files depend on, for the cache key: the name for gpt2, else the tokenizer's full definition."""
        if self.hf is None:
            return self.name
        return hashlib.sha1(self.hf.backend_tokenizer.to_str().encode()).hexdigest()

    def save(self, folder):
        """A copy of a Hugging Face tokenizer in folder/tokenizer (gpt2 needs none): a checkpoint moved elsewhere keeps it."""
        if self.hf is not None:
            self.hf.save_pretrained(os.path.join(folder, "tokenizer"))

    def transformers(self, max_len):
        """The tokenizer to save beside an exported model, framing a text as pretraining did whatever template this one
        had (a byte-level BPE a user trains often has none, and RoBERTa's frames pairs otherwise)."""
        if self.hf is None:
            return transformers_tokenizer(max_len)
        from tokenizers import Tokenizer as Backend
        roles = {f"{r}_token": getattr(self.hf, f"{r}_token") for r in ("cls", "sep", "mask", "pad", "unk", "bos", "eos")}
        return as_transformers(Backend.from_str(self.hf.backend_tokenizer.to_str()), max_len, roles)


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


MODEL_INPUTS = ["input_ids", "token_type_ids", "attention_mask"]  # what a tokenizer gives our exported models
# Each role's usual token, for a bare tokenizer.json, which names no roles: BERT's, then RoBERTa's.
ROLE_TOKENS = dict(cls=("[CLS]", "<s>"), sep=("[SEP]", "</s>"), mask=("[MASK]", "<mask>"), pad=("[PAD]", "<pad>"),
                   unk=("[UNK]", "<unk>"))


def load_tokenizer(name="gpt2"):
    """
    "gpt2", or a Hugging Face fast tokenizer: a tokenizer.json file, a folder one was saved in, or a hub name.
    Fails in one sentence when it does not load or lacks a role.
    """
    if name == "gpt2":
        enc = get_encoding()
        return Tokenizer("gpt2", GPT2, lambda texts: enc.encode_ordinary_batch(texts, num_threads=os.cpu_count()))
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError:
        raise ValueError(f"--tokenizer {name} is a Hugging Face tokenizer, which needs `pip install transformers`") from None
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.endswith(".json")):
        raise ValueError(f"--tokenizer {name} does not exist; give gpt2, a tokenizer.json, a folder holding one, or a hub name")
    try:
        if os.path.isfile(name):
            hf = PreTrainedTokenizerFast(tokenizer_file=name, model_input_names=MODEL_INPUTS)
        else:
            hf = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise ValueError(f"--tokenizer {name} is neither gpt2 nor a Hugging Face tokenizer (a tokenizer.json, a folder "
                         f"holding one, or a hub name): {type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    if not hf.is_fast:
        raise ValueError(f"--tokenizer {name} has no fast (Rust) version; save one with tokenizers, as a tokenizer.json")
    if len(hf) == GPT2.n_ids and hf.convert_ids_to_tokens(list(GPT2.special)) == GPT2_SPECIAL_TOKENS:
        return load_tokenizer("gpt2")  # transformers_tokenizer's, as --export saves it: the same ids, tiktoken's speed
    known = hf.get_vocab()
    for role, tokens in ROLE_TOKENS.items():  # a bare tokenizer.json: find each role's token by its usual name
        if getattr(hf, f"{role}_token") is None:
            setattr(hf, f"{role}_token", next((t for t in tokens if t in known), None))
    lacking = [ROLE_TOKENS[r][0] for r in ("cls", "sep", "mask", "pad") if getattr(hf, f"{r}_token") is None]
    if lacking:
        raise ValueError(f"--tokenizer {name} lacks {' and '.join(lacking)} (or {', '.join(ROLE_TOKENS[r][1] for r in ('cls', 'sep', 'mask', 'pad'))}): "
                         f"masked-LM pretraining needs a [CLS], a [SEP], a [MASK] and a [PAD] token")
    eod = hf.eos_token_id if hf.eos_token is not None else hf.sep_token_id
    vocab = Vocab(n_ids=len(hf), pad=hf.pad_token_id, cls=hf.cls_token_id, sep=hf.sep_token_id, mask=hf.mask_token_id,
                  eod=eod, special=tuple(sorted(set(hf.all_special_ids) | {eod})))
    if vocab.n_ids <= len(vocab.special):  # what transformers builds of a model folder that has no tokenizer files
        raise ValueError(f"--tokenizer {name} has only special tokens ({' '.join(hf.convert_ids_to_tokens(list(vocab.special)))}), "
                         "no vocabulary to train on")
    backend = hf.backend_tokenizer
    backend.no_truncation()  # a tokenizer.json saved with truncation on would cut every document short
    backend.no_padding()
    # the library's call on whole texts; tokenizers >= 0.20 can skip the character offsets, ~30% of its time
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    whole = lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
    if encodes_word_by_word(backend):
        return Tokenizer(name, vocab, functools.partial(encode_by_words, whole, separators(backend)), hf)
    return Tokenizer(name, vocab, whole, hf)


# Pre-tokenizers that cut the text at every space (the first three) or only cut further: with one of the first three
# and no other, a text's ids are its space-separated words' ids one after the other. Byte-level BPE (GPT-2, RoBERTa)
# and SentencePiece's Metaspace are not among them: they carry the space into the next word's tokens.
SPLIT_AT_SPACES = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
SPLIT_FURTHER = {"Punctuation", "Digits", "UnicodeScripts"}


def encodes_word_by_word(backend):
    """Whether a tokenizers.Tokenizer's ids of a text are those of its space-separated words one after another: its
    pre-tokenizer splits at every space, and no normalizer (Replace, Prepend, SentencePiece's Precompiled) nor added
    token with a space in it could make a space mean more."""
    spec = json.loads(backend.to_str())
    pre, norm = spec["pre_tokenizer"] or {}, spec["normalizer"] or {}
    types = {p.get("type") for p in pre.get("pretokenizers", [pre])}
    return (bool(types & SPLIT_AT_SPACES) and types <= SPLIT_AT_SPACES | SPLIT_FURTHER
            and not {n.get("type") for n in norm.get("normalizers", [norm])} & {"Replace", "Prepend", "Precompiled"}
            and not any(" " in t["content"] for t in spec["added_tokens"]))


def separators(backend):
    """
    The (character, id) pairs encode_by_words can put between words: a punctuation mark or symbol (no case or accent
    normalizer makes one from a letter) that the vocabulary holds as a token of its own and that, between spaces,
    encodes to that token alone. Rarest first, as far as the vocabulary's order tells: the later ids.
    """
    return [(t, i) for t, i in sorted(backend.get_vocab().items(), key=lambda item: -item[1])
            if len(t) == 1 and unicodedata.category(t)[0] in "PS"
            and backend.encode(f" {t} ", add_special_tokens=False).ids == [i]]


def encode_by_words(whole, marks, texts):
    """
    The ids of texts (by a tokenizer for which encodes_word_by_word holds; whole: its call on whole texts; marks: its
    separators()), each distinct word tokenized once: in a chunk of Wikipedia one word in eight is new, so the
    tokenizer's per-character work shrinks ~6x, and numpy copies each word's ids to its every occurrence. The distinct
    words go to the library as 16 texts per core (its threads stay evenly busy: ~10% faster than one per core), each
    word followed by a separator that none of them contains, so the ids between two separators are one word's (the
    character offsets would tell the same, at about twice the time).
    Exact: the same ids as encoding the texts whole, which it falls back to when no separator fits.
    """
    if not texts:
        return []
    number = {}  # word -> its number, in order of first sight
    words = [np.array([number.setdefault(w, len(number)) for w in t.split(" ")], dtype=np.int64) for t in texts]
    distinct, present = list(number), set("".join(number))
    sep, sep_id = next(((c, i) for c, i in marks if c not in present), (None, None))
    if sep is None:
        return whole(texts)
    parts, glue = min(16 * (os.cpu_count() or 1), len(distinct)), f" {sep} "
    bounds = [len(distinct) * p // parts for p in range(parts + 1)]
    ids = np.concatenate([np.array(e, dtype=np.int64) for e in whole(
        [glue.join(distinct[a:b]) + glue for a, b in zip(bounds, bounds[1:])])])
    at = np.flatnonzero(ids == sep_id)
    if len(at) != len(distinct):  # the normalizer made a separator of another character ("=" of "≠")
        return whole(texts)
    counts = np.diff(at, prepend=-1) - 1  # each distinct word's number of tokens
    ids, first = np.delete(ids, at), at - np.arange(len(at)) - counts  # where each word's tokens start in ids
    seen = np.concatenate(words)  # every occurrence of every word, in order
    n = counts[seen]
    ends = np.cumsum(n)
    out = ids[np.repeat(first[seen] - (ends - n), n) + np.arange(ends[-1])]
    return [t.tolist() for t in np.split(out, ends[np.cumsum([len(w) for w in words])[:-1] - 1])]


def own_tokenizer(source, flag, remedy):
    """The tokenizer saved with a model (its folder or hub name: --init_from, finetune.py --ckpt DIR); missing or broken,
    one sentence naming flag and source, and the remedy."""
    try:
        return load_tokenizer(source)
    except ValueError as e:
        raise ValueError(f"{flag} {source} holds no tokenizer that loads (it {str(e).removeprefix(f'--tokenizer {source} ')}); "
                         f"{remedy}") from None


def saved_tokenizer(folder, name):
    """The tokenizer a checkpoint in folder was trained with (name: as it records it): gpt2, else the copy the run
    kept in folder/tokenizer, else name itself (a hub name, or a path that still holds it)."""
    if name in (None, "gpt2"):  # checkpoints from before --tokenizer are gpt2's
        return load_tokenizer("gpt2")
    copy = os.path.join(folder, "tokenizer")
    for source in (copy, name) if os.path.isdir(copy) else (name,):
        try:
            return replace(load_tokenizer(source), name=name)
        except ValueError:
            pass
    raise ValueError(f"the checkpoint in {folder} was trained with the tokenizer {name}, which loads neither from "
                     f"{copy} nor from {name}; put the tokenizer back in one of them")


GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"  # what tiktoken builds its gpt2 from


def transformers_tokenizer(max_len=512):
    """
    This tokenizer as a transformers one (for an exported model): gpt2's byte-level BPE from the files
    tiktoken reads (its cache), our four special tokens at their ids, and rows laid out as ours
    (as_transformers). [MASK] takes the space before it, as a masked word took its space in pretraining
    ("Paris is the [MASK] of France").
    """
    from tiktoken.load import read_file_cached
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    get_encoding()  # offline without the cache: its one-line error
    vocab = json.loads(read_file_cached(GPT2_FILES + "encoder.json"))
    merges = [tuple(line.split()) for line in read_file_cached(GPT2_FILES + "vocab.bpe").decode().splitlines()[1:] if line]
    bpe = Tokenizer(models.BPE(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = dict(zip(GPT2_SPECIAL_TOKENS[1:], GPT2.special[1:]))
    bpe.add_special_tokens([AddedToken(t, lstrip=t == "[MASK]", normalized=False) for t in specials])
    assert all(bpe.token_to_id(t) == i for t, i in specials.items()), "gpt2's vocabulary should end at <|endoftext|>"
    return as_transformers(bpe, max_len, dict(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"))


def as_transformers(backend, max_len, roles):
    """A tokenizers.Tokenizer -> the transformers tokenizer of an exported model (roles: cls_token=..., None = none),
    framing rows as pretraining and finetune.encode_pair do: [CLS] a [SEP], pairs [CLS] a [SEP] b [SEP] with token
    types 0 then 1."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    cls, sep = roles["cls_token"], roles["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_len, model_input_names=MODEL_INPUTS,
                                   **{role: token for role, token in roles.items() if token is not None})


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
# Preparation: tokenize once, write train.bin / val.bin (uint16, or uint32 for a vocabulary above 65,536 ids)
# and meta.json into a cache folder.

def cache_folder(data, config, cache_dir, max_tokens, tok=None):
    """One folder per source (path + size + mtime, or hub name + config), token cap and tokenizer (tok: None = gpt2)."""
    if is_local_path(data):
        key = [os.path.abspath(data)] + [(f, os.path.getsize(f), os.path.getmtime(f)) for f in _source_files(data)]
    else:
        key = [data, config]
    if tok is not None and tok.name != "gpt2":  # gpt2's folders keep the names they had before there was a choice
        key.append(tok.fingerprint())
    key = json.dumps([FORMAT, max_tokens] + key)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(data)))[:40]
    return os.path.join(cache_dir, f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")


def prepare(data, config=DEFAULT_CONFIG, cache_dir="data_cache", max_tokens=None, tok=None):
    """Tokenizes a corpus (tok: a Tokenizer, None = gpt2) unless its cache folder is complete; returns the folder."""
    folder = cache_folder(data, config, cache_dir, max_tokens, tok)
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    os.makedirs(cache_dir, exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a run beside us preparing the same source: wait, then use its folder
        if not os.path.exists(os.path.join(folder, "meta.json")):
            _tokenize(data, config, folder, max_tokens, tok or load_tokenizer())
    return folder


def _tokenize(data, config, folder, max_tokens, tok):
    """prepare()'s work, under its lock: writes the folder through a temporary one."""
    dtype = token_dtype(tok.vocab)
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
                encoded = tok.encode_batch([text for text, _, _ in chunk])
                for (_, last, progress), ids in zip(chunk, encoded):
                    split = ("val" if n_docs % VAL_EVERY == 0 else "train") if holdout else name
                    if last:  # the end-of-document token between documents, not between pieces of one
                        ids.append(tok.vocab.eod)
                        n_docs += 1
                    ids = ids[:budget - counts[split]]  # the cap is exact, even inside a long document
                    np.asarray(ids, dtype=dtype).tofile(files[split])
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
    meta = dict(source=data, config=None if holdout else config, tokenizer=tok.name, dtype=np.dtype(dtype).name, format=FORMAT,
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
    """Groups pieces into ~4M-character chunks, the unit tokenized in parallel (tiktoken's or tokenizers' threads)."""
    chunk, size = [], 0
    for item in docs:
        chunk.append(item)
        size += len(item[0])
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def token_dtype(vocab):
    """The narrowest unsigned integer that holds every id."""
    return np.uint16 if vocab.n_ids <= 1 << 16 else np.uint32


def load_tokens(folder, split):
    """The token stream of a split as a read-only memmap, checked against meta.json's length."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    n, dtype = meta[f"{split}_tokens"], np.dtype(meta.get("dtype", "uint16"))
    path = os.path.join(folder, f"{split}.bin")
    if not os.path.exists(path) or os.path.getsize(path) != dtype.itemsize * n:
        raise ValueError(f"{path} does not hold the {n} tokens meta.json promises (truncated?); "
                         f"delete {folder} and run again to rebuild it")
    return np.memmap(path, dtype=dtype, mode="r")


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


def mask_tokens(ids, example_ids, seed, rate=MASK_PROB, vocab=GPT2):
    """
    Dynamic masking (BERT): rate (15%) of the non-special positions; 80% of those become [MASK], 10% a
    random ordinary token, 10% stay. ids: (B, T) -> (input_ids (B, T), positions (B, M), targets (B, M));
    targets are -100 where a row had fewer than M maskable positions.
    """
    B, T = ids.shape
    is_special, ordinary = id_tables(vocab, ids.device)
    pick, action, random_token = (example_uniform(seed, example_ids, T, s) for s in range(3))
    special = is_special[ids]
    positions = torch.where(special, 2.0, pick).topk(n_masked(T, rate), dim=1, largest=False).indices.sort(dim=1).values
    original = ids.gather(1, positions)
    maskable = ~special.gather(1, positions)
    action = action.gather(1, positions)
    random_token = ordinary[(random_token.gather(1, positions) * len(ordinary)).long()]
    new = torch.where(action < 0.8, vocab.mask, torch.where(action < 0.9, random_token, original))
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

    def __init__(self, tokens, seq_len, seed, device, mask_rate=MASK_PROB, noise_draws=1, vocab=GPT2):
        self.tokens, self.seq_len, self.seed, self.device, self.mask_rate = tokens, seq_len, seed, device, mask_rate
        self.noise_draws, self.vocab = noise_draws, vocab
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
        ids = torch.cat([torch.full((len(rows), 1), self.vocab.cls), body, torch.full((len(rows), 1), self.vocab.sep)], dim=1)
        ex = torch.from_numpy(np.asarray(example_ids, dtype=np.int64))
        if self.device.type == "cuda":
            ids, ex = ids.pin_memory().to(self.device, non_blocking=True), ex.to(self.device, non_blocking=True)
        input_ids, positions, targets = mask_tokens(ids, ex, self.seed, self.mask_rate, self.vocab)
        # the first draw is the same whatever the number of draws: a run's kept tokens do not depend on it
        noise = example_uniform(self.seed, ex, self.noise_draws * self.seq_len, stream=3)
        return Batch(input_ids, positions, targets, noise.view(len(rows), self.noise_draws, self.seq_len))
