"""Where each kind of token sits in one batch row: system / image / query / assistant tag / generated.

Positions are absolute indices into the (left-padded) sequence the model sees, so a layout built for a
row alone is moved into a batch with :meth:`TokenLayout.shifted`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Token positions of one prompt.

    Attributes:
        length: prompt length in tokens, padding included.
        pad: number of left-padding tokens (positions ``[0, pad)``).
        image_spans: half-open ``(start, end)`` spans of image tokens, one per image, in prompt order.
        image_grids: ``(rows, cols)`` of each image's token grid (``rows * cols == end - start``).
        query_span: half-open span of the tokens of the user's question text.
        content_positions: positions of content-word tokens inside the query (GIFT).
    """

    length: int
    pad: int
    image_spans: tuple[tuple[int, int], ...]
    image_grids: tuple[tuple[int, int], ...]
    query_span: tuple[int, int]
    content_positions: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        for (start, end), (rows, cols) in zip(self.image_spans, self.image_grids, strict=True):
            if rows * cols != end - start:
                raise ValueError(f"image grid {rows}x{cols} does not cover span {start}:{end}")

    @property
    def image_end(self) -> int:
        """First position after the last image token (VAR edits prefill rows from here on)."""
        return self.image_spans[-1][1] if self.image_spans else self.pad

    @cached_property
    def image_positions(self) -> torch.Tensor:
        """All image-token positions (``I_vis``), as a 1-D LongTensor."""
        if not self.image_spans:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([torch.arange(s, e) for s, e in self.image_spans])

    def image_mask(self, total: int) -> torch.Tensor:
        """Boolean mask of length ``total`` that is True on image tokens."""
        mask = torch.zeros(total, dtype=torch.bool)
        mask[self.image_positions] = True
        return mask

    def query_mask(self, total: int) -> torch.Tensor:
        """Boolean mask of length ``total`` that is True on the query tokens."""
        mask = torch.zeros(total, dtype=torch.bool)
        mask[self.query_span[0] : self.query_span[1]] = True
        return mask

    def shifted(self, extra_pad: int) -> TokenLayout:
        """The same prompt with ``extra_pad`` more left-padding tokens in front."""
        if extra_pad == 0:
            return self
        return replace(
            self,
            length=self.length + extra_pad,
            pad=self.pad + extra_pad,
            image_spans=tuple((s + extra_pad, e + extra_pad) for s, e in self.image_spans),
            query_span=(self.query_span[0] + extra_pad, self.query_span[1] + extra_pad),
            content_positions=tuple(p + extra_pad for p in self.content_positions),
        )
