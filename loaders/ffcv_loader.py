"""FFCV loader over the packed .beton shards, with the caption draw and the crop as compiled FFCV decoders.

Per field:
  image  -> SeededCropDecoder (loaders/ffcv_ops/crop_decoder.py: decode + crop in one numba op) -> ToTensor
  record -> CaptionDecoder (loaders/ffcv_ops/caption_decoder.py: decompress, draw, pad to int32 tokens) -> ToTensor
  index  -> IntDecoder -> ToTensor (global sample index, handed out with the batch)
so no Python runs per sample. Normalisation happens once per batch in torch (augment.normalize).

One ffcv Loader per shard file, built on first use and kept (numba compiles once per Loader; later
epochs reuse the compiled code). FFCV allocates an iterator's buffers at every iter(), page-locked on a
CUDA host (cudaHostAlloc: slow, and held by torch's pinned allocator): each Loader here allocates them
once and every later shard visit reuses them (a visit starts when the Loader's previous iterator has
finished; the batches it handed out live until the consumer asks for the next, as within one FFCV
epoch). Our EpochSampler decides the order: a rank's positions are cut into runs that stay in one shard,
each run is fed to that shard's Loader as its index list, and the outputs are re-cut into the sampler's
batches. The epoch (which the compiled draw must see without a recompile)
lives in a small numpy array whose address the compiled code reads with memcpy each batch.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from loaders.base import PackedLoader
from loaders.packed import PackError, sample_key


def _import_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:  # the torch loader serves where FFCV is missing
        raise ImportError("the FFCV loader needs `ffcv` (pip install ffcv==1.0.2); use kind='torch'") from e


def check_beton(path: Path, num_samples: int) -> None:
    """A clear error for a missing or truncated .beton before FFCV reads past its end."""
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    if not path.is_file():
        raise PackError(f"{path}: missing shard")
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise PackError(f"{path}: truncated ({size} bytes, smaller than the FFCV header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    table_at = int(header["alloc_table_ptr"])
    if int(header["num_samples"]) != num_samples:
        raise PackError(f"{path}: {int(header['num_samples'])} samples, meta.json says {num_samples}")
    if table_at >= size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise PackError(f"{path}: truncated ({size} bytes, allocation table starts at {table_at})")
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        raise PackError(f"{path}: truncated or corrupt (data pages end past the allocation table)")


class FfcvLoader(PackedLoader):
    """Iterable of batches for one (rank, epoch) over the .beton shards."""

    _shard_loaders: dict = {}  # (path, config) -> (ffcv Loader, params array): kept across epochs

    def __init__(self, root, config=None, **options):
        _import_ffcv()
        super().__init__(root, config, **options)
        c = self.config
        for shard in self.packed.meta["shards"]:
            check_beton(self._beton(shard["name"]), shard["num_samples"])
        # what a shard's compiled Loader depends on (its cache key)
        self.pipeline = dict(batch_size=c.batch_size, text_mode=c.text_mode if c.draw_text else None,
                             num_workers=c.num_workers, image_size=c.image_size, max_texts=c.max_texts,
                             slip_views=c.slip_views, augment=c.augment, check_records=c.check_records,
                             text_weights=tuple(self.text_weights.tolist()))
        self.crcs = self.packed.record_crcs() if c.check_records else None

    def _beton(self, name: str) -> Path:
        return self.packed.root / "ffcv" / f"{name}.beton"

    _warm: set = set()  # keys of Loaders whose compiled code has run once

    def _key(self, shard: int):
        beton = self._beton(self.packed.meta["shards"][shard]["name"])
        return str(beton.resolve()), os.stat(beton).st_mtime_ns, tuple(sorted(self.pipeline.items()))

    def _is_warm(self, shard: int) -> bool:
        return self._key(shard) in self._warm

    def _shard_loader(self, shard: int):
        key = self._key(shard)
        if key not in self._shard_loaders:
            self._shard_loaders[key] = self._build(shard)
        loader, params, keys, _ = self._shard_loaders[key]
        params[:] = (self.sampler.seed, self.sampler.epoch)
        return loader, keys

    def _bad_samples(self, index: torch.Tensor) -> list[int]:
        """Global indices of this batch whose JPEG the compiled decoder flagged (no decode, bad CRC)."""
        first = self.packed.shards.first_index
        shard = np.searchsorted(first, index.numpy(), side="right") - 1
        out = []
        for k in np.unique(shard):
            bad = self._shard_loaders.get(self._key(int(k)), (None,) * 4)[3]
            sel = index.numpy()[shard == k]
            if bad is not None and bad[sel - first[k]].any():
                out += sel[bad[sel - first[k]] != 0].tolist()
        return out

    def _build(self, shard: int):
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader
        from ffcv.loader import OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor

        from loaders.augment import CROP_RATIO, CROP_SCALE, SIMCLR_SCALE
        from loaders.ffcv_ops.caption_decoder import caption_decoder_class
        from loaders.ffcv_ops.crop_decoder import crop_decoder_class
        from loaders.native import ddict
        from model.tokenizer import get_tokenizer

        c, size = self.pipeline, (self.pipeline["image_size"],) * 2
        first, n = int(self.packed.shards.first_index[shard]), int(self.packed.shards.sizes[shard])
        crcs = self.crcs[first:first + n] if self.crcs is not None else None
        params = np.zeros(2, dtype=np.int64)
        bad = np.zeros(n, dtype=np.uint8)  # set by the crop op for a JPEG that is corrupt
        crop_class = crop_decoder_class()
        # one warm buffer per decode thread needs threads <= batch slots (the buffers FFCV allocates)
        common = dict(params=params, first_index=first, bad=bad, crcs=None if crcs is None else crcs[:, 0],
                      warm=c["num_workers"] <= c["batch_size"])

        if c["augment"]:
            image = crop_class(size, scale=CROP_SCALE, ratio=CROP_RATIO, view=0, **common)
        else:
            image = crop_class(size, scale=None, ratio=1.0, view=0, **common)
        pipelines = {"image": [image, ToTensor()], "index": [IntDecoder(), ToTensor()], "record_len": None}
        if c["text_mode"] is not None:
            tok = get_tokenizer()
            decoder = caption_decoder_class()(
                ddict=ddict(self.packed.dictionary), params=params, first_index=first, mode=c["text_mode"],
                max_texts=c["max_texts"], sot=tok.sot_token_id, eot=tok.eot_token_id,
                crcs=None if crcs is None else crcs[:, 1], weights=np.array(c["text_weights"]))
            pipelines["record"] = PipelineSpec("record", decoder=decoder, transforms=[ToTensor()])
        else:
            pipelines["record"] = None
        if c["slip_views"]:
            for view in (1, 2):
                pipelines[f"view{view}"] = PipelineSpec(
                    "image", crop_class(size, scale=SIMCLR_SCALE, ratio=CROP_RATIO, view=view, **common),
                    transforms=[ToTensor()])
        name = self.packed.meta["shards"][shard]["name"]
        loader = Loader(str(self._beton(name)), batch_size=c["batch_size"], num_workers=c["num_workers"],
                        order=OrderOption.SEQUENTIAL, drop_last=False, pipelines=pipelines,
                        indices=np.arange(1), batches_ahead=3)
        _allocate_once(loader)
        return loader, params, list(loader.pipeline_specs), bad  # output order: file fields, then views

    def _runs(self):
        """(shard, local ids) runs covering this rank's positions from start_batch: one per shard visit
        (at most one shard's ids in memory; a wrapped-round padding tail, or a range of the sampler's
        `remaining` that ends inside a visit, is a run of its own).
        FFCV cuts a run into batch_size chunks from its first id, so a visit that starts inside a batch
        is split: a head that completes that batch, then a rest that lands on batch bounds. Otherwise
        every later batch would straddle two chunks and be re-cut by a copy (14% of the CPU per epoch,
        measured on 256 px clip art)."""
        s = self.sampler
        lo = s.start_batch * s.batch_size
        stop = lo + s.positions_left()
        while lo < stop:
            pos = int(s.global_positions(lo, lo + 1)[0])
            visit = int(np.searchsorted(s.visit_ends, pos, side="right"))
            hi = min(stop, lo + int(s.visit_ends[visit]) - pos, s.contiguous_end(lo))  # one shard, one range
            shard = int(s.shard_order[visit])
            local = s.indices(lo, hi) - s.shards.first_index[shard]
            head = -lo % s.batch_size
            if 0 < head < len(local):
                yield shard, local[:head]
                local = local[head:]
            yield shard, local
            lo = hi

    _iterators: dict = {}  # Loader key -> its latest FFCV epoch iterator (they share the Loader's buffers)

    def _start(self, run, started: list):
        """Start FFCV's reader thread on a run (it decodes ahead while the previous run is consumed)."""
        shard, local = run
        loader, keys = self._shard_loader(shard)
        previous = self._iterators.get(self._key(shard))
        if previous is not None:
            if not previous.terminate_event.is_set():  # neither exhausted nor closed: in use elsewhere
                raise RuntimeError(f"{self._beton(self.packed.meta['shards'][shard]['name'])}: two epochs with "
                                   "the same options read this shard at once (they share its buffers); "
                                   "finish or close one first")
            previous.join()  # its thread is leaving; then its buffers are free
        loader.indices = loader.traversal_order.indices = local.astype(np.uint64)
        loader.first_traversal_order = loader.indices
        it = self._iterators[self._key(shard)] = iter(loader)
        started.append(it)
        return it, keys

    def __iter__(self):
        started = []  # this epoch's FFCV iterators
        try:
            yield from self._batches(started)
        finally:  # an epoch left early (break, an error) stops FFCV's threads: later visits reuse the buffers
            for it in started:
                it.close()

    def _batches(self, started: list):
        s, pending, have = self.sampler, [], 0
        sizes = [s.batch_bounds(b)[1] - s.batch_bounds(b)[0] for b in range(s.start_batch, s.num_batches)]
        runs = self._runs()
        run = next(runs, None)
        current = self._start(run, started) if run is not None else None
        while current is not None:
            nxt = next(runs, None)
            # Prefetch the next run unless it reuses this run's Loader (one epoch iterator per Loader) or
            # its Loader has never run: numba compiles on first call, and two threads compiling the
            # shared jitted helpers at once can fail inside numba.
            ahead = None
            if nxt is not None and nxt[0] != run[0] and self._is_warm(nxt[0]):
                ahead = self._start(nxt, started)
            it, keys = current
            for out in it:
                self._warm.add(self._key(run[0]))
                chunk = dict(zip(keys, out))
                pending.append(chunk)
                have += len(chunk["index"])
                while sizes and have >= sizes[0]:
                    batch, pending, have = _take(pending, sizes[0], keys), [], have - sizes[0]
                    if have:  # keep the remainder (copied: FFCV reuses its buffers)
                        rest = {k: v.clone() for k, v in batch.pop("__rest__").items()}
                        pending = [rest]
                    batch.pop("__rest__", None)
                    sizes.pop(0)
                    yield self._finish(batch)
            if pending:  # the run ended mid-batch: its buffers go back to FFCV
                pending = [{k: v.clone() for k, v in p.items()} for p in pending]
            run = nxt
            current = ahead if ahead is not None else (self._start(nxt, started) if nxt is not None else None)

    def _finish(self, batch):
        raw = {"images": batch["image"], "index": batch["index"].view(-1).long()}
        bad = self._bad_samples(raw["index"])
        if bad:
            raise self._corrupt(bad[0], "JPEG does not decode" + (" or fails its checksum" if self.crcs is not None
                                                                 else ""))
        if "record" in batch:
            flagged = batch["record"].flatten(1)[:, 0] < 0
            if flagged.any():
                raise self._corrupt(int(raw["index"][flagged][0]), "caption record does not decompress"
                                    + (" or fails its checksum" if self.crcs is not None else ""))
            raw["tokens"] = batch["record"]
            if self.text_mode == "all":
                raw["mask"] = batch["record"][:, :, 0] != 0  # a filled slot starts with sot
        if "view1" in batch:
            raw["view1"], raw["view2"] = batch["view1"], batch["view2"]
        return self.finish(raw)

    def _corrupt(self, index: int, what: str) -> PackError:
        shard = int(np.searchsorted(self.packed.shards.first_index, index, side="right")) - 1
        beton = self._beton(self.packed.meta["shards"][shard]["name"])
        return PackError(f"{beton}: sample {index} (key {sample_key(self.packed.root, index)}): {what} "
                         "(corrupted .beton?)")


def _allocate_once(loader) -> None:
    """Make the FFCV Loader's iterators share one set of buffers instead of allocating per iter()."""
    allocate, buffers = loader.graph.allocate_memory, {}

    def allocate_once(batch_size, batches_ahead):
        if (batch_size, batches_ahead) not in buffers:
            buffers[batch_size, batches_ahead] = allocate(batch_size, batches_ahead)
        return buffers[batch_size, batches_ahead]
    loader.graph.allocate_memory = allocate_once


def _take(pending: list[dict], n: int, keys: list[str]) -> dict:
    """Concatenate pending chunks and split off the first n samples (remainder under "__rest__")."""
    if len(pending) == 1 and len(pending[0]["index"]) == n:
        return dict(pending[0])
    joined = {k: torch.cat([p[k] for p in pending]) for k in keys}
    batch = {k: v[:n] for k, v in joined.items()}
    if len(joined["index"]) > n:
        batch["__rest__"] = {k: v[n:] for k, v in joined.items()}
    return batch
