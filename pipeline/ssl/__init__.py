"""Pre-training objectives of SkySense V2: views, losses (which own their state), teacher EMA, meta-architecture."""

from .augment import CropGeometry, MultiViewAugment, ViewGroup
from .contrastive import info_nce
from .ema import update_ema
from .gcpl import GCPLLoss, sinkhorn_knopp
from .meta_arch import SSLMetaArch
from .mgcl import MGCLLoss
from .qsacl import QSACLLoss, QueryDecoder
from .regions import DEFAULT_NUM_REGIONS, region_id, resolve_region, unknown_region
from .schedules import cosine_lr, momentum_schedule, param_groups, weight_decay_schedule

__all__ = [
    "DEFAULT_NUM_REGIONS",
    "CropGeometry",
    "GCPLLoss",
    "MGCLLoss",
    "MultiViewAugment",
    "QSACLLoss",
    "QueryDecoder",
    "SSLMetaArch",
    "ViewGroup",
    "cosine_lr",
    "info_nce",
    "momentum_schedule",
    "param_groups",
    "region_id",
    "resolve_region",
    "sinkhorn_knopp",
    "unknown_region",
    "update_ema",
    "weight_decay_schedule",
]
