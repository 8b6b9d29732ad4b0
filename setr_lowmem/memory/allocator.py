"""The CUDA caching allocator's settings, chosen by the toolkit rather than left to the user.

`expandable_segments:True` lets the allocator grow one mapped segment instead of caching
many fixed-size blocks, so memory freed by one phase (the decoder's full-resolution tensors
in forward) can be reused by the next (backward) without fragmentation: on an H100 with
plain SETR-PUP at batch 16 it lowered the reserved peak for the same allocated peak
(docs/reference/h100_plain_pytorch.csv, the row "same, expandable segments" against the one
before it). It must be set before the first CUDA allocation; a value the user already set
is kept.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

SETTING = "expandable_segments:True"


def configure_cuda_allocator() -> str:
    """Set PYTORCH_CUDA_ALLOC_CONF unless the user did; returns the value in effect."""
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if current is None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = SETTING
        return SETTING
    log.info("keeping the user's PYTORCH_CUDA_ALLOC_CONF=%s", current)
    return current
