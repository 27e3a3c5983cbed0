"""Image-text retrieval: recall@K both ways on a set of captioned images.

An image may have several captions (Flickr, COCO): image -> text counts a hit when any of the image's
captions is among its top K, text -> image when the caption's own image is among its top K. Scores are
cosine similarities; ties rank as torch.topk ranks them, as in CLIP_benchmark.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def retrieval(image_features: np.ndarray, text_features: torch.Tensor, caption_image=None,
              ks: list[int] = (1, 5, 10)) -> dict:
    """recall@K for each K of ks, both ways, in percent. Text t belongs to image caption_image[t] (default: t).
    image_to_text: an image is a hit if any of its texts is among its top K; text_to_image: a text is a
    hit if its image is among its top K. Ties rank as torch.topk ranks them (as in CLIP_benchmark)."""
    images = F.normalize(torch.from_numpy(image_features), dim=-1)
    owner = torch.arange(len(images)) if caption_image is None else torch.as_tensor(caption_image)
    scores = text_features @ images.T                                    # [texts, images]
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    out = {}
    for name, s, pos in (("image_to_text", scores.T, positive.T), ("text_to_image", scores, positive)):
        for k in dict.fromkeys(ks):                                     # each K once, in the order asked
            top = s.topk(min(k, s.shape[1]), dim=1).indices
            hits = pos.gather(1, top).any(dim=1)
            out[f"{name}_R@{k}"] = 100 * int(hits.sum()) / len(hits)
    return out
