"""Real, varied caption corpora available offline, shared by tests and benchmarks.

Sources: emoji names in every language the `emoji` package ships (accents, CJK, Cyrillic), openclipart
file names from Debian's openclipart-svg (noisy web-style titles), mixed with the hard cases of a web
crawl: HTML entities, markup, numbers, punctuation runs, URLs, emoji, odd whitespace, control
characters, overlong and empty captions.
"""
from __future__ import annotations

import glob
import os
import random
import re


def emoji_names() -> list[str]:
    import emoji

    names = []
    for data in emoji.EMOJI_DATA.values():
        for lang, name in data.items():
            if isinstance(name, str) and name.startswith(":"):
                names.append(name.strip(":").replace("_", " "))
    return sorted(set(names))


_SVG_FIELDS = re.compile(r"<dc:title>([^<]*)</dc:title>|<dc:description>([^<]*)</dc:description>|"
                         r"<rdf:li>([^<]*)</rdf:li>")


def clipart_captions(root: str = "/usr/share/openclipart/svg") -> list[str]:
    """Alt-text-like captions of openclipart drawings: title, description and keywords from each
    SVG's metadata (the library's own title "Open Clip Art Library" dropped)."""
    captions = []
    for path in sorted(glob.glob(f"{root}/**/*.svg", recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            fields = _SVG_FIELDS.findall(f.read())
        titles = [t for t, _, _ in fields if t.strip() and t != "Open Clip Art Library"]
        descriptions = [d for _, d, _ in fields if d.strip()]
        keywords = [k for _, _, k in fields if k.strip()]
        parts = titles[:1] + descriptions[:1] + ([", ".join(keywords[:8])] if keywords else [])
        if parts:
            captions.append(". ".join(p.strip() for p in parts))
    return captions


def clipart_titles() -> list[str]:
    files = glob.glob("/usr/share/openclipart/svg/**/*.svg", recursive=True)
    return sorted({os.path.splitext(os.path.basename(f))[0].replace("_", " ").replace("-", " ")
                   for f in files})


_ODD_BITS = ["&amp;", "&lt;b&gt;", "&quot;", "&#39;", "&amp;amp;", "<i>", "</p>", "&nbsp;", "...", "!!",
             "?!", "--", "(", ")", "#1", "$19.99", "3.14", "1,000,000", "2023", "x86_64", "@user",
             "https://example.com/a?b=c", "C++", "don't", "it's", "we'll", "I'M", "O'Neil", "''",
             "😀", "👍🏽", "🇫🇷", "❤️", "★", "→", "½", "²", "ﬁ", "“", "”", "’", "–", "—", "Æ", "İ",
             "straße", "ΟΔΟΣ", "naïve", "café", "日本", "中文", "한국어", "عربى", "\t", "\n", "  ",
             "\x0b", "\u00a0", "\u200b", "\u3000", "<start_of_text>", "<end_of_text>", "\x1b[31m"]


def varied_captions(n: int, seed: int = 0) -> list[str]:
    """n captions: real names and titles, combined and salted with web-crawl oddities."""
    rng = random.Random(seed)
    words = emoji_names() + clipart_titles()
    captions = ["", " ", "a", "A" * 300, " ".join(["word"] * 120), "!" * 200, "12345678901234567890"]
    while len(captions) < n:
        parts = rng.sample(words, rng.randint(12, 30) if rng.random() < 0.03 else rng.randint(1, 4))
        for _ in range(rng.randint(0, 3)):
            parts.insert(rng.randint(0, len(parts)), rng.choice(_ODD_BITS))
        sep = rng.choice([" ", " ", " ", ", ", " - ", "  ", ". "])
        text = sep.join(parts)
        captions.append(text.upper() if rng.random() < 0.05 else text)
    return captions[:n]
