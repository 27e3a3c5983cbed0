"""Builders for the real image-text sets available offline (Debian / PyPI packages, no downloads).

  openclipart: /usr/share/openclipart/png/<category>/.../<name>.png, paired with svg/<same path>.svg whose
               RDF metadata has dc:title, dc:description and keywords (dc:subject). Caption = title, plus
               the description where it adds something; titles shared by a whole icon collection
               ("Lemon SVG theme") get the file name in front so the caption says what the icon is.
               Category = top-level folder (22 classes, for zero-shot later).
               Other human texts (alt_texts): the title alone, the description alone, the keywords.
  emoji:       every fully-qualified emoji of the `emoji` package rendered with Noto Color Emoji (a bitmap
               font: size 109 only) onto white. Caption = its name (":grinning_face:" -> "grinning face").
               Category = Unicode block of the first code point (the package has no group data).
               Sequences the font has no single glyph for (they render as several glyphs) are skipped.
               Other human texts (alt_texts): the package's aliases (":thumbsup:" -> "thumbsup").

`build_dataset` writes an image folder: images/<key>.jpg + captions.jsonl (key, file, caption, category,
split, and alt_texts where the set has them: {field: text} of the sample's other human-written texts, each
different from the caption: the demo's faithful "rewrites" and its queries in other wording) with a
fixed held-out split by hash of the key. A held-out sample whose image (same bytes) or caption (same
words, case-insensitive) also occurs in the training split or earlier in the held-out split is marked
"duplicate" instead: retrieval on the held-out split has no ties with a training pair and no repeats
inside itself. Re-running with the same arguments reuses the result; images already
written are kept.

`open_source(spec, report)` is the one entry point for any input: a builder name above, or what
packing/ingest.py reads (an image folder with a captions file, LaCLIP's CSV, a captions JSONL, tar shards).
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import glob
import hashlib
import html
import json
import multiprocessing
import os
import random
import re
from typing import Iterator

from tqdm import tqdm

from common.config import ConfigError, option
from common.text import normalize_words

from packing.images import atomic_write_bytes, encode_jpeg_pil
from packing.ingest import (IngestError, IngestReport, Sample, find_captions_file, iter_image_folder,
                            iter_laclip_csv, iter_webdataset)

OPENCLIPART_ROOT = "/usr/share/openclipart"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
BUILD_VERSION = 3  # 2: held-out duplicates of training or held-out samples marked "duplicate"; 3: alt_texts


def default_cache() -> str:
    return os.environ.get("LACLIP_DATA", os.path.expanduser("~/.cache/laclip/datasets"))


def heldout_split(key: str, fraction: float) -> str:
    """Fixed split from the key alone: stable when the set grows or is subsampled."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h < fraction else "train"


def mark_heldout_duplicates(rows: list[dict], image_digest) -> int:
    """Set split = "duplicate" on held-out rows that repeat a training row's image or caption, or an
    earlier held-out row's (rows in key order). `image_digest(row)` gives the bytes' hash. Returns the
    number marked."""
    def caption_key(row):
        return " ".join(row["caption"].lower().split())

    seen_images = {image_digest(r) for r in rows if r["split"] == "train"}
    seen_captions = {caption_key(r) for r in rows if r["split"] == "train"}
    marked = 0
    for row in sorted((r for r in rows if r["split"] == "test"), key=lambda r: r["key"]):
        image, caption = image_digest(row), caption_key(row)
        if image in seen_images or caption in seen_captions:
            row["split"] = "duplicate"
            marked += 1
        seen_images.add(image)
        seen_captions.add(caption)
    return marked


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def _safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def alt_texts(caption: str, fields: dict[str, str]) -> dict[str, str]:
    """The fields that say something in other words than the caption: empty ones and ones with the
    caption's words (or an earlier field's) are left out."""
    seen, out = {normalize_words(caption)}, {}
    for name, text in fields.items():
        text = " ".join(text.split())
        if text and normalize_words(text) not in seen:
            out[name] = text
            seen.add(normalize_words(text))
    return out


# ---------------------------------------------------------------- openclipart
_META_RE = re.compile(rb"<metadata.*?</metadata>", re.S)
_TAG_RE = re.compile(r"<[^>]+>")


def _svg_field(meta: str, tag: str) -> str:
    m = re.search(rf"<dc:{tag}>(.*?)</dc:{tag}>", meta, re.S)
    return " ".join(html.unescape(_TAG_RE.sub(" ", m.group(1))).split()) if m else ""


def openclipart_records(root: str = OPENCLIPART_ROOT) -> tuple[list[dict], IngestReport]:
    """One record per PNG with its SVG metadata: key, src, caption, category, keywords."""
    report = IngestReport()
    items = []
    for dirpath, _, files in os.walk(os.path.join(root, "png")):
        for name in files:
            if name.endswith(".png"):
                items.append(os.path.relpath(os.path.join(dirpath, name), os.path.join(root, "png"))[:-4])
    items.sort()
    parsed = []
    for rel in items:
        key = "oc-" + _safe_key(rel.replace(os.sep, "-"))
        svg = os.path.join(root, "svg", rel + ".svg")
        if not os.path.isfile(svg):
            report.skip("missing_svg", key, svg)
            continue
        with open(svg, "rb") as f:
            m = _META_RE.search(f.read(400_000))  # metadata sits at the top of the file
        meta = m.group(0).decode("utf-8", "replace") if m else ""
        work = meta.split("<cc:Agent")[0]  # agents (publisher, creator) carry their own dc:title
        title, desc = _svg_field(work, "title"), _svg_field(work, "description")
        desc = re.sub(r"HASH\(0x[0-9a-f]+\)", "", desc).strip()  # a Perl export bug in some files
        subject = re.search(r"<dc:subject>(.*?)</dc:subject>", meta, re.S)
        keywords = [k.strip() for k in re.findall(r"<rdf:li>(.*?)</rdf:li>", subject.group(1))] if subject else []
        parsed.append((rel, key, title, desc, [k for k in keywords if k and k != "unsorted"]))
    title_counts = collections.Counter(p[2].lower() for p in parsed)
    records, seen = [], set()
    for rel, key, title, desc, keywords in parsed:
        if title and title_counts[title.lower()] >= 10:  # a collection name, not a description
            title = " ".join(re.split(r"[_\-\s]+", os.path.basename(rel))).strip() + ", " + title
        parts = [title] if title else []
        if desc and desc.lower() != title.lower():
            parts.append(desc)
        caption = ". ".join(parts)
        if not caption:
            report.skip("empty_caption", key, os.path.join(root, "svg", rel + ".svg"))
            continue
        if key in seen:
            report.skip("duplicate_key", key, rel)
            continue
        seen.add(key)
        records.append({"key": key, "src": os.path.join(root, "png", rel + ".png"), "caption": caption,
                        "category": rel.split(os.sep)[0], "keywords": keywords,
                        "alt_texts": alt_texts(caption, {"title": title, "description": desc,
                                                         "keywords": ", ".join(keywords)})})
    return records, report


def _openclipart_image(src: str, size: int):
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im).convert("RGB")  # transparent clip art -> on white
    im.thumbnail((size, size), Image.Resampling.LANCZOS)  # long side <= size, aspect kept
    return im


# ---------------------------------------------------------------- emoji
_BLOCKS = [  # (first, last, name) of the Unicode blocks emoji start in
    (0x1F1E6, 0x1F1FF, "flags"), (0x1F300, 0x1F5FF, "symbols and pictographs"),
    (0x1F600, 0x1F64F, "emoticons"), (0x1F680, 0x1F6FF, "transport and map"),
    (0x1F900, 0x1F9FF, "supplemental symbols and pictographs"),
    (0x1FA70, 0x1FAFF, "symbols and pictographs extended"), (0x2600, 0x26FF, "miscellaneous symbols"),
    (0x2700, 0x27BF, "dingbats"), (0x1F000, 0x1F2FF, "enclosed and game symbols"),
]


def _emoji_category(ch: str) -> str:
    cp = ord(ch[0])
    if ch[0] in "#*0123456789":
        return "keycaps"
    return next((name for a, b, name in _BLOCKS if a <= cp <= b), "other symbols")


def emoji_records() -> tuple[list[dict], IngestReport]:
    import emoji
    from PIL import ImageFont

    font = ImageFont.truetype(EMOJI_FONT, 109)
    single = font.getlength("\U0001F600")
    report = IngestReport()
    records = []
    for ch, data in emoji.EMOJI_DATA.items():
        if data.get("status") != emoji.STATUS["fully_qualified"]:
            continue  # the unqualified / component variants duplicate a fully-qualified one
        key = "emoji-" + "-".join(f"{ord(c):x}" for c in ch)
        if font.getlength(ch) > 1.2 * single:  # no ligature in the font: would draw several glyphs
            report.skip("no_single_glyph", key, EMOJI_FONT)
            continue
        caption = data["en"].strip(":").replace("_", " ")
        aliases = {f"alias {i}": a.strip(":").replace("_", " ") for i, a in enumerate(data.get("alias", []))}
        records.append({"key": key, "src": ch, "caption": caption, "category": _emoji_category(ch),
                        "alt_texts": alt_texts(caption, aliases)})
    records.sort(key=lambda r: r["key"])
    return records, report


def _emoji_image(ch: str, size: int):
    from PIL import Image, ImageDraw

    font = _emoji_font()
    canvas = Image.new("RGBA", (136, 136), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((0, 4), ch, font=font, embedded_color=True)
    if canvas.getbbox() is None:
        return None  # the font has no glyph: nothing drawn
    im = Image.alpha_composite(Image.new("RGBA", canvas.size, (255, 255, 255, 255)), canvas).convert("RGB")
    return im.resize((size, size), Image.Resampling.LANCZOS)


_FONT = None


def _emoji_font():
    global _FONT
    if _FONT is None:
        from PIL import ImageFont

        _FONT = ImageFont.truetype(EMOJI_FONT, 109)
    return _FONT


# ---------------------------------------------------------------- build
BUILDERS = {"openclipart": (openclipart_records, _openclipart_image), "emoji": (emoji_records, _emoji_image)}


def _render(job) -> tuple[str, str | None]:
    name, src, path, size = job
    if os.path.exists(path):
        return path, None
    try:
        im = BUILDERS[name][1](src, size)
    except Exception as e:  # a broken source image is reported, not fatal
        return path, f"{type(e).__name__}: {e}"
    if im is None:
        return path, "nothing rendered"
    atomic_write_bytes(path, encode_jpeg_pil(im, 95))
    return path, None


def build_dataset(name: str, out_dir: str, *, max_samples: int | None = None, image_size: int = 256,
                  seed: int = 0, heldout_fraction: float = 0.1, workers: int = 2) -> str:
    """Write <out_dir>/images/<key>.jpg and <out_dir>/captions.jsonl; return out_dir."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
    params = {"version": BUILD_VERSION, "name": name, "max_samples": max_samples, "image_size": image_size,
              "seed": seed, "heldout_fraction": heldout_fraction}
    done = os.path.join(out_dir, "build.json")
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f).get("params") == params:
                return out_dir
        # different arguments: captions and images are rewritten (images by size in their path)
    records, report = BUILDERS[name][0]()
    available = len(records)
    if max_samples is not None and max_samples < len(records):
        records = sorted(random.Random(seed).sample(records, max_samples), key=lambda r: r["key"])
    img_dir = os.path.join(out_dir, f"images-{image_size}")
    os.makedirs(img_dir, exist_ok=True)
    jobs = [(name, r["src"], os.path.join(img_dir, r["key"] + ".jpg"), image_size) for r in records]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, workers)) as pool:
        results = list(tqdm(pool.imap(_render, jobs, chunksize=16), total=len(jobs), desc=f"build {name}",
                            leave=False))
    rows = []
    for r, (path, err) in zip(records, results):
        if err is not None:
            report.skip("broken_image", r["key"], str(r["src"]), err)
            continue
        row = {"key": r["key"], "file": os.path.relpath(path, out_dir), "caption": r["caption"],
               "category": r["category"], "split": heldout_split(r["key"], heldout_fraction)}
        for field in ("keywords", "alt_texts"):
            if r.get(field):
                row[field] = r[field]
        rows.append(row)
    duplicates = mark_heldout_duplicates(rows, lambda row: _file_digest(os.path.join(out_dir, row["file"])))
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    atomic_write_bytes(os.path.join(out_dir, "captions.jsonl"), ("\n".join(lines) + "\n").encode())
    summary = {"params": params, "available": available, "written": len(lines),
               "heldout_duplicates": duplicates,
               "skipped": dict(report.counts), "skipped_records": report.records[:50]}
    atomic_write_bytes(done, json.dumps(summary, indent=1).encode())
    print(f"build {name}: {len(lines)} samples written to {out_dir}, {duplicates} held-out duplicates "
          f"set aside ({report.summary()})")
    return out_dir


def iter_samples(name: str, out_dir: str | None = None, *, split: str | None = None,
                 report: IngestReport | None = None, **build_kwargs) -> Iterator[Sample]:
    """Build (or reuse) the set and stream its samples; `split` = "train" | "test" | None for all."""
    root = build_dataset(name, out_dir or os.path.join(default_cache(), name), **build_kwargs)
    for s in iter_image_folder(root, report if report is not None else IngestReport()):
        if split is None or s.meta.get("split") == split:
            yield s


# ---------------------------------------------------------------- one entry point
# Here rather than in ingest.py, which it would make import the builders while they import it.
def open_source(spec: str, report: IngestReport, *, image_root: str | None = None,
                data_root: str | None = None, max_samples: int | None = None) -> Iterator[Sample]:
    """Dispatch on what `spec` is: a builder name ("openclipart", "emoji"), an image folder with a captions
    file, a .csv (LaCLIP), or tar shards (file, directory of tars, glob, brace list, URL or pipe:)."""
    if spec in BUILDERS:
        root = build_dataset(spec, os.path.join(data_root or default_cache(), spec), max_samples=max_samples)
        return iter_image_folder(root, report)
    if os.path.isdir(spec) and find_captions_file(spec):
        it = iter_image_folder(spec, report)
    elif spec.endswith(".csv"):
        it = iter_laclip_csv(spec, image_root, report)
    elif spec.endswith((".jsonl",)):
        it = iter_image_folder(image_root or os.path.dirname(os.path.abspath(spec)), report, captions_file=spec)
    else:
        it = iter_webdataset(spec, report)
    return _limit(it, max_samples)


def check_source(spec: str) -> None:
    """What open_source cannot read, as one IngestError saying what it does read, before any work starts:
    a missing or empty captions file, missing tar shards, an unreadable URL (its first shard is read), a name
    that is neither a path nor a builder."""
    from common.io import RemoteError, check_url, expand_shards, is_url
    if is_url(spec):
        if spec.endswith((".csv", ".jsonl")) or spec.rstrip("/").endswith("captions"):
            raise IngestError(f"{spec}: remote inputs are tar shards (https://, s3://, gs://, pipe:CMD; a brace "
                              "list or glob of them); a captions file with images needs local files")
        try:
            check_url(expand_shards(spec, IngestError)[0])
        except RemoteError as e:
            raise IngestError(str(e)) from None
        return
    if spec in BUILDERS:
        return
    captions = spec if spec.endswith((".csv", ".jsonl")) else (
        find_captions_file(spec) if os.path.isdir(spec) else None)
    if captions:
        if not os.path.isfile(captions):
            raise IngestError(f"{captions}: no such file")
        if os.path.getsize(captions) == 0:
            raise IngestError(f"{captions}: empty file (no captions)")
    elif os.path.exists(spec) or glob.has_magic(spec) or "{" in spec:
        expand_shards(spec, IngestError)  # names what is missing
    elif os.sep in spec:
        raise IngestError(f"{spec}: no such file or folder")
    else:
        close = difflib.get_close_matches(spec, list(BUILDERS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise IngestError(f"{spec}: no such file or folder, and not a builder name ({hint}builders: "
                          f"{', '.join(sorted(BUILDERS))})")


def _limit(it: Iterator[Sample], n: int | None) -> Iterator[Sample]:
    for i, s in enumerate(it):
        if n is not None and i >= n:
            return
        yield s


@dataclasses.dataclass
class BuildConfig:
    name: str = option("openclipart", help="which set to build", choices=("openclipart", "emoji"))
    out: str = option("", help="the image folder to write (captions.jsonl + images)")
    max_samples: int | None = option(None, help="at most this many samples (null: all)")
    image_size: int = option(256, help="longest image side in pixels")
    seed: int = option(0, help="seed of the sample choice")
    heldout_fraction: float = option(0.1, help="fixed held-out split, by hash of the sample key")
    workers: int = option(2, help="image rendering processes")

    def validate(self):
        if not self.out:
            raise ConfigError("out", "where to write the set is required (--out DIR)")


def main(argv=None) -> None:
    """python -m packing.builders NAME --out DIR: build an offline image-text set as an image folder."""
    from common.config import build_parser, parse
    parser = build_parser(BuildConfig, "python -m packing.builders", main.__doc__, flags="all")
    parser.add_argument("set_name", nargs="?", choices=sorted(BUILDERS), help="= --name")
    cfg, args = parse(BuildConfig, parser, argv)  # a bad key or value: one line, exit 2
    name = args.set_name or cfg.name
    build_dataset(name, cfg.out, max_samples=cfg.max_samples, image_size=cfg.image_size, seed=cfg.seed,
                  heldout_fraction=cfg.heldout_fraction, workers=cfg.workers)


if __name__ == "__main__":
    main()
