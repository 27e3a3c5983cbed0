"""CLIP's byte-level BPE tokenizer, compiled.

Gives exactly the ids of the reference CLIP tokenizer (OpenAI CLIP / open_clip `SimpleTokenizer`,
clean="lower") but encodes through Hugging Face `tokenizers` (Rust) instead of a Python BPE loop.

The reference pipeline per caption is: ftfy.fix_text -> html.unescape twice -> strip -> collapse
whitespace -> lower-case -> regex pre-split -> byte-to-unicode map -> BPE with "</w>" word ends ->
[sot] + ids + [eot], cut to the context keeping the end token. Clean-up stays in Python (it is a few
string calls); ftfy, the slow part, is skipped for plain printable ASCII without "&", where it and
html.unescape provably change nothing. Everything after clean-up runs in the compiled tokenizer.

The vocabulary file `bpe_simple_vocab_16e6.txt.gz` is OpenAI's CLIP BPE (MIT licence, see
LICENSE-CLIP-VOCAB beside this file).
"""
from __future__ import annotations

import gzip
import hashlib
import html
import os
import re
from functools import lru_cache
from typing import Sequence

import numpy as np

CONTEXT_LENGTH = 77
VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# Fixed by the vocabulary layout (256 bytes, 256 word-final bytes, merges, then the two specials).
VOCAB_SIZE = 49408
SOT_TOKEN_ID, EOT_TOKEN_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1
# The reference takes merges 1 .. 48894 of the file (line 0 is a version header).
NUM_MERGES = 49152 - 256 - 2
# Pre-split pattern of the reference (applied to lower-cased text, so IGNORECASE is moot).
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Characters that send a caption through ftfy + html.unescape: anything non-ASCII, "&" (entities) and
# ASCII control characters other than tab/newline/carriage return (ftfy deletes them).
_NEEDS_FULL_CLEAN = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")
# Joins the texts of a batch for one regex pass; a lone control character that clean-up never leaves.
_TEXT_SEPARATOR = "\x00"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clean_caption(text: str) -> str:
    """The reference clean-up: ftfy, double HTML unescape, whitespace collapse, lower case."""
    if _NEEDS_FULL_CLEAN.search(text):
        import ftfy  # imported lazily: most captions never need it

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def has_tokens(text: str | None) -> bool:
    """Whether a text gives at least one token: not empty once cleaned (ftfy drops control characters)."""
    return bool(text) and bool(clean_caption(text))


class _WordTable:
    """Word -> its BPE ids, kept as slices of one growing token buffer so a batch gathers in numpy.

    Word 0 is the text separator: it has no tokens, so texts of a joined batch end where it stands.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        self.index: dict[str, int] = {_TEXT_SEPARATOR: 0}
        self.starts = np.zeros(1 << 12, dtype=np.int64)
        self.lengths = np.zeros(1 << 12, dtype=np.int64)
        self.tokens = np.zeros(1 << 14, dtype=np.uint16)
        self.num_words, self.num_tokens = 1, 0

    def add(self, word: str, ids: Sequence[int]) -> None:
        n = len(ids)
        if self.num_words == len(self.starts):
            self.starts = np.resize(self.starts, 2 * len(self.starts))
            self.lengths = np.resize(self.lengths, 2 * len(self.lengths))
        while self.num_tokens + n > len(self.tokens):
            self.tokens = np.resize(self.tokens, 2 * len(self.tokens))
        self.starts[self.num_words] = self.num_tokens
        self.lengths[self.num_words] = n
        self.tokens[self.num_tokens:self.num_tokens + n] = ids
        self.index[word] = self.num_words
        self.num_words += 1
        self.num_tokens += n


class ClipTokenizer:
    """CLIP BPE (49,408 tokens) with a batch API.

    `encode` gives the content ids of each text (no start/end token) as uint16 arrays, cut so that
    start + ids + end fits the context: this is what the caption store keeps on disk.
    `__call__` gives the padded [N, context] LongTensor that open_clip.tokenize gives.

    Speed: CLIP's BPE works word by word. A batch is joined and pre-split in one regex call (the
    stdlib `re` for plain ASCII, where the reference's \\p{L}/\\p{N} classes reduce to [a-z]/[0-9];
    the `regex` module otherwise), words seen before come from a table, only new words go through the
    compiled BPE (`tokenizers`) in one batch call, and the ids are gathered with numpy.
    """

    def __init__(self, vocab_file: str = VOCAB_FILE, cache_words: int = 1_000_000):
        import regex
        from tokenizers import Tokenizer, models, pre_tokenizers

        with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        byte_chars = list(_byte_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += list(SPECIAL_TOKENS)
        token_to_id = {token: i for i, token in enumerate(vocab)}

        # One input = one pre-split word: byte-map it, then BPE with CLIP's "</w>" word ends.
        bpe = Tokenizer(models.BPE(vocab=token_to_id, merges=merges, end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._bpe = bpe
        # The reference matches its special tokens inside caption text too, before anything else.
        specials = "|".join(SPECIAL_TOKENS)
        self._split_unicode = regex.compile(specials + "|" + SPLIT_PATTERN).findall
        self._split_ascii = re.compile(specials + r"|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+").findall
        self._words = _WordTable(cache_words)

        self._id_to_token = vocab
        self._unicode_to_byte = {c: b for b, c in _byte_to_unicode().items()}
        self._special_ids = {t: token_to_id[t] for t in SPECIAL_TOKENS}
        self.vocab_size = len(vocab)
        self.sot_token_id = token_to_id[SPECIAL_TOKENS[0]]
        self.eot_token_id = token_to_id[SPECIAL_TOKENS[1]]
        self.context_length = CONTEXT_LENGTH
        assert (self.vocab_size, self.sot_token_id, self.eot_token_id) == (VOCAB_SIZE, SOT_TOKEN_ID, EOT_TOKEN_ID)
        self.identity = tokenizer_identity(vocab_file)

    def _word_indices(self, words: list[str]) -> np.ndarray:
        table = self._words
        found = list(map(table.index.get, words))
        if None in found:
            new = list(dict.fromkeys(w for w, i in zip(words, found) if i is None))
            if table.num_words + len(new) > table.capacity:
                # Full: start over, and re-encode every word of this batch (the ones found a moment ago
                # are gone with the old table). A batch larger than the table still fits, for now.
                table.clear()
                new = [w for w in dict.fromkeys(words) if w not in table.index]
            for word, encoding in zip(new, self._bpe.encode_batch_fast(new, add_special_tokens=False)):
                table.add(word, [self._special_ids[word]] if word in self._special_ids else encoding.ids)
            found = list(map(table.index.__getitem__, words))
        return np.array(found, dtype=np.int64)

    def _encode_cleaned(self, joined: str, split, keep: int) -> list[np.ndarray]:
        """Ids of the texts in `joined` (texts separated by the separator word), each cut to `keep`."""
        table = self._words
        words = self._word_indices(split(joined))
        lengths = table.lengths[words]
        ends = np.cumsum(lengths)
        # Gather every word's slice of the token buffer in one indexing operation.
        positions = np.repeat(table.starts[words] - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)
        tokens = table.tokens[positions]
        bounds = [0, *ends[words == 0].tolist(), len(tokens)]
        return [tokens[b:min(e, b + keep)] for b, e in zip(bounds[:-1], bounds[1:])]

    def encode(self, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> list[np.ndarray]:
        """Content ids per text (uint16, no start/end token), at most context_length - 2 of them."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        if not texts:
            return []
        keep = context_length - 2
        separator = f" {_TEXT_SEPARATOR} "
        if not _NEEDS_FULL_CLEAN.search("".join(texts)):
            # Plain ASCII: only lower-casing matters (whitespace never reaches a token).
            return self._encode_cleaned(separator.join(texts).lower(), self._split_ascii, keep)
        # Only texts with non-ASCII, "&" or control characters need ftfy; the rest are lower-cased
        # with their group in one call.
        cleaned = [clean_caption(t) if _NEEDS_FULL_CLEAN.search(t) else t for t in texts]
        plain = [i for i, t in enumerate(cleaned) if t.isascii()]
        other = [i for i, t in enumerate(cleaned) if not t.isascii()]
        out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        for indices, split in ((plain, self._split_ascii), (other, self._split_unicode)):
            if indices:
                joined = separator.join(cleaned[i] for i in indices).lower()
                for i, ids in zip(indices, self._encode_cleaned(joined, split, keep)):
                    out[i] = ids
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH):
        import torch

        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, ids in zip(out, self.encode(texts, context_length)):
            row[0] = self.sot_token_id
            row[1:len(ids) + 1] = ids
            row[len(ids) + 1] = self.eot_token_id
        return torch.from_numpy(out)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of content ids, or of a padded row (read up to its end token, start token skipped)."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot_token_id:
            ids = ids[1:]
        if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
        # Word ends are marked in tokens, not bytes: re-insert them as spaces.
        words = "".join(self._id_to_token[i] for i in ids).split("</w>")
        return " ".join(bytes(self._unicode_to_byte[c] for c in w).decode("utf-8", errors="replace")
                        for w in words if w)


@lru_cache(maxsize=None)
def tokenizer_identity(vocab_file: str = VOCAB_FILE) -> dict:
    """What packed files record about the tokenizer that made them (cheap: no BPE built)."""
    with open(vocab_file, "rb") as f:
        vocab_sha256 = hashlib.sha256(f.read()).hexdigest()
    return {"name": "clip-bpe-16e6", "vocab_size": VOCAB_SIZE, "vocab_sha256": vocab_sha256,
            "context_length": CONTEXT_LENGTH}


@lru_cache(maxsize=None)
def get_tokenizer() -> ClipTokenizer:
    return ClipTokenizer()
