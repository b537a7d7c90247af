"""Interpolation (``F.interpolate``): the resampled dims are positions, the channels before them pass through, as
for a pool. timm resamples a ViT's position table this way when it runs at another input size
(``_upsample_bicubic2d_aa``, the antialiased bicubic of ``resample_abs_pos_embed``)."""

from __future__ import annotations

from ..api import register_rule
from .pointwise import pool

register_rule(
    "upsample_nearest1d", "upsample_nearest3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bicubic2d", "upsample_trilinear3d",
    "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
)(pool)
