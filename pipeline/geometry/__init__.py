"""Geometry shared by the stages that handle objects: oriented boxes, their overlaps and non-maximum suppression.

Pure functions on arrays (no stage imports), used by the detection head's decoding (:mod:`pipeline.model.heads`),
the detection data adapters and metric, and the cross-tile merge of region jobs (:mod:`pipeline.mosaic`).
"""

from .boxes import (
    areas,
    box_overlaps,
    candidate_pairs,
    hbb_of,
    is_axis_aligned,
    nms,
    normalize_boxes,
    obb_to_polygons,
    polygons_to_obb,
    quads_to_obb,
    rects_to_obb,
    rotated_iou,
    score_order,
    shapely_polygons,
    suppress,
)

__all__ = [
    "areas", "box_overlaps", "candidate_pairs", "hbb_of", "is_axis_aligned", "nms", "normalize_boxes",
    "obb_to_polygons", "polygons_to_obb", "quads_to_obb", "rects_to_obb", "rotated_iou", "score_order",
    "shapely_polygons", "suppress",
]  # fmt: skip
