"""packing/: the write side. Ingest of the formats users have (ingest.py), the embedded sets' builders
(builders.py), image preparation (images.py), the caption join (join.py), the caption store's writer
(caption_writer.py) and the pack itself (pack.py), which writes the packed folder that loaders/ reads
(docs/packed-format.md is the contract between the two; loaders/caption_codec.py that of the caption store).

    python -m packing --input captions.jsonl --rewrites rewrites/ --out packed/
"""
