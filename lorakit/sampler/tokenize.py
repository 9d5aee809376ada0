"""Tokenizers for the text encoders, with the data found on the user's machine (never shipped).

* CLIP (SD1.5, SDXL's both encoders, Flux's clip_l): byte-level BPE over ``vocab.json`` +
  ``merges.txt``, implemented here (NFC, whitespace collapsed, lower case; words are runs of
  letters, single digits, runs of other symbols, and the English contractions).
* T5 v1.1 (Flux's t5xxl): the Unigram ``tokenizer.json`` through the ``tokenizers`` library.

Prompts are read the ComfyUI way: ``(text:1.2)`` weights a span, bare ``(text)`` multiplies by 1.1
per level, ``\\(`` is a literal parenthesis; words are tokenized one by one and packed into chunks
of ``BOS + 75 + EOS`` (CLIP) without splitting short words, padded as each encoder expects.

Where the data is looked for, in order: the ``path`` given (a folder with ``clip/`` and ``t5/``, or
the files' own folder), ``$LORAKIT_TOKENIZERS``, a ComfyUI install (``$COMFYUI_PATH``, ``~/ComfyUI``,
``./ComfyUI``), the Hugging Face cache (``$HF_HOME`` / ``~/.cache/huggingface``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..errors import TokenizerError

CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
CLIP_FILES = ("vocab.json", "merges.txt")
T5_FILES = ("tokenizer.json",)
# where ComfyUI and Hugging Face snapshots keep the same files
COMFY_DIRS = {"clip": "comfy/sd1_tokenizer", "t5": "comfy/text_encoders/t5_tokenizer"}
HF_REPOS = {"clip": ["openai--clip-vit-large-patch14/snapshots/*", "black-forest-labs--FLUX.1-dev/snapshots/*/tokenizer",
                     "stabilityai--stable-diffusion-xl-base-1.0/snapshots/*/tokenizer"],
            "t5": ["black-forest-labs--FLUX.1-dev/snapshots/*/tokenizer_2", "google--t5-v1_1-xxl/snapshots/*"]}




def find(kind: str, path: str | os.PathLike | None = None) -> Path:
    """The folder holding the ``kind`` ("clip" or "t5") tokenizer files."""
    files = CLIP_FILES if kind == "clip" else T5_FILES
    candidates: list[Path] = []
    for root in (path, os.environ.get("LORAKIT_TOKENIZERS")):
        if root:
            candidates += [Path(root) / kind, Path(root)]
    comfy_roots = [os.environ.get("COMFYUI_PATH"), Path.home() / "ComfyUI", Path.cwd() / "ComfyUI"]
    candidates += [Path(r) / COMFY_DIRS[kind] for r in comfy_roots if r]
    hf = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    for pattern in HF_REPOS[kind]:
        candidates += [Path(p) for p in sorted(glob.glob(str(hf / f"models--{pattern}")))]
    for c in candidates:
        if all((c / f).is_file() for f in files):
            return c
    raise TokenizerError(
        f"no {kind.upper()} tokenizer data ({', '.join(files)}) found; looked in --tokenizers, $LORAKIT_TOKENIZERS, "
        f"ComfyUI ({COMFY_DIRS[kind]}) and the Hugging Face cache. Point --tokenizers (or LORAKIT_TOKENIZERS) at a "
        f"folder with {kind}/{files[0]}, e.g. a ComfyUI checkout's {COMFY_DIRS[kind]}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _category(c: str) -> str:
    return unicodedata.category(c)[0]


def _words(text: str) -> list[str]:
    """CLIP's pre-tokenisation of normalised text (letters+, one number, other symbols+)."""
    out, i, n = [], 0, len(text)
    while i < n:
        special = next((s for s in SPECIAL if text.startswith(s, i)), None)
        if special:
            out.append(special)
            i += len(special)
            continue
        c = text[i]
        contraction = next((s for s in CONTRACTIONS if text.startswith(s, i)), None) if c == "'" else None
        if contraction:
            out.append(contraction)
            i += len(contraction)
        elif c.isspace():
            i += 1
        elif _category(c) == "L":
            j = i
            while j < n and _category(text[j]) == "L":
                j += 1
            out.append(text[i:j])
            i = j
        elif _category(c) == "N":
            out.append(c)
            i += 1
        else:
            j = i
            while j < n and not text[j].isspace() and _category(text[j]) not in ("L", "N"):
                j += 1
            out.append(text[i:j])
            i = j
    return out


class ClipTokenizer:
    bos, eos = 49406, 49407

    @property
    def size(self) -> int:
        """Token ids this tokenizer can produce (the text encoder needs as many embeddings)."""
        return max(self.vocab.values(), default=-1) + 1

    def __init__(self, folder: Path) -> None:
        self.vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
        merges = [tuple(m.split()) for m in lines if m and not m.startswith("#version")]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_table = _bytes_to_unicode()
        self.bos = self.vocab.get("<|startoftext|>", self.bos)
        self.eos = self.vocab.get("<|endoftext|>", self.eos)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one tokenizer per process)
    def _bpe(self, word: str) -> tuple[str, ...]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, k = min(pairs)
            if rank == 1 << 30:
                break
            first, second = parts[k], parts[k + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of the best pair, left to right
                if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS / EOS."""
        text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
        ids = []
        for w in _words(text):
            if w in SPECIAL:
                ids.append(self.vocab[w])
                continue
            mapped = "".join(self.byte_table[b] for b in w.encode("utf-8"))
            ids += [self.vocab[p] for p in self._bpe(mapped)]
        return ids


class T5Tokenizer:
    eos, pad = 1, 0

    def __init__(self, folder: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError("the T5 tokenizer needs the 'tokenizers' package: pip install 'lorakit[sample]'") from None
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    @property
    def size(self) -> int:
        """Token ids this tokenizer can produce (the text encoder needs as many embeddings)."""
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the closing </s>."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ids


def parse_weights(prompt: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """ComfyUI prompt weights: ``(a:1.3)`` sets, ``(a)`` multiplies by 1.1, nested; ``\\(`` is literal."""
    out: list[tuple[str, float]] = []
    depth, start, buf = 0, 0, ""
    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\" and i + 1 < len(prompt) and prompt[i + 1] in "()":
            if depth == 0:
                buf += prompt[i + 1]
            i += 2
            continue
        if c == "(":
            if depth == 0:
                if buf:
                    out.append((buf, weight))
                    buf = ""
                start = i
            depth += 1
        elif c == ")" and depth > 0:
            depth -= 1
            if depth == 0:
                inner = prompt[start + 1:i]
                w = weight * 1.1
                colon = _top_level_colon(inner)
                if colon is not None:
                    try:
                        w, inner = float(inner[colon + 1:]), inner[:colon]
                    except ValueError:
                        pass
                out += parse_weights(inner, w)
        elif depth == 0:
            buf += c
        i += 1
    if depth > 0:  # unbalanced: the rest is plain text
        buf += prompt[start:]
    if buf:
        out.append((buf, weight))
    return out


def _top_level_colon(s: str) -> int | None:
    colon = s.rfind(":")
    return colon if colon > 0 and "(" not in s[colon:] and ")" not in s[colon:] else None


@dataclass
class Tokens:
    """One prompt for one encoder: rows of ids (chunks) and per-token weights."""

    ids: list[list[int]]
    weights: list[list[float]]


MAX_WORD_TOKENS = 8  # a word of this many tokens may be split across chunks; shorter ones move whole


def _words_as_tokens(encode, prompt: str, vocab: dict[str, int] | None = None) -> list[list[tuple[int, float]]]:
    """ComfyUI's grouping: weighted spans split on spaces, each word tokenized on its own (a word
    that is itself a vocabulary entry, ``word</w>``, is taken as that entry)."""
    groups = []
    for text, weight in parse_weights(prompt):
        for word in text.replace("\n", " ").split(" "):
            if word:
                exact = vocab.get(word + "</w>") if vocab else None
                groups.append([(t, weight) for t in ([exact] if exact is not None else encode(word))])
    return groups


def _chunks(groups: list[list[tuple[int, float]]], *, start: int | None, end: int, pad: int, length: int,
            pad_to_length: bool = True, min_length: int = 0) -> Tokens:
    """Fill chunks of ``length`` (start + tokens + end), moving a short word that would straddle a
    chunk to the next one and splitting long words, as ComfyUI's tokenizer does."""
    head = [] if start is None else [(start, 1.0)]
    rows, row = [], list(head)
    for group in groups:
        large = len(group) >= MAX_WORD_TOKENS
        while group:
            if len(group) + len(row) > length - 1:
                room = length - len(row) - 1
                if large:
                    row, group = row + group[:room], group[room:]
                    rows.append(row + [(end, 1.0)])
                else:
                    rows.append(row + [(end, 1.0)] + ([(pad, 1.0)] * room if pad_to_length else []))
                row = list(head)
            else:
                row, group = row + group, []
    row.append((end, 1.0))
    if pad_to_length:
        row += [(pad, 1.0)] * (length - len(row))
    row += [(pad, 1.0)] * (min_length - len(row))
    rows.append(row)
    return Tokens([[t for t, _ in r] for r in rows], [[w for _, w in r] for r in rows])


def clip_tokens(tok: ClipTokenizer, prompt: str, *, pad: int | None = None, length: int = 77) -> Tokens:
    """Chunks of BOS + up to 75 tokens + EOS, padded to 77 with ``pad`` (default: EOS, as SD1.5 /
    clip_l; SDXL's bigG pads with 0)."""
    return _chunks(_words_as_tokens(tok.encode, prompt, tok.vocab), start=tok.bos, end=tok.eos,
                   pad=tok.eos if pad is None else pad, length=length)


def t5_tokens(tok: T5Tokenizer, prompt: str, *, min_length: int = 256) -> Tokens:
    """Prompt tokens, then </s>, padded with 0 to ``min_length`` (ComfyUI's Flux T5 input): one chunk."""
    return _chunks(_words_as_tokens(tok.encode, prompt), start=None, end=tok.eos, pad=tok.pad, length=1 << 30,
                   pad_to_length=False, min_length=min_length)
