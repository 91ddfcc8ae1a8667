"""Pre-training objectives of SkySense V2: views, losses (which own their state), teacher EMA, meta-architecture."""

from .augment import CropGeometry, MultiViewAugment, ViewGroup
from .contrastive import info_nce
from .ema import update_ema
from .gcpl import GCPLLoss, sinkhorn_knopp
from .meta_arch import SSLMetaArch
from .mgcl import MGCLLoss
from .qsacl import QSACLLoss, QueryDecoder
from .schedules import cosine_lr, momentum_schedule, param_groups, weight_decay_schedule

__all__ = [
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
    "sinkhorn_knopp",
    "update_ema",
    "weight_decay_schedule",
]
