"""timm backbones (feature maps, tokens, attention) and the MoCo projection heads."""

from fgray.models.backbone import AttentionForward, Backbone, create_backbone
from fgray.models.heads import mlp, moco_v2_projector, moco_v3_predictor, moco_v3_projector

__all__ = [
    "AttentionForward",
    "Backbone",
    "create_backbone",
    "mlp",
    "moco_v2_projector",
    "moco_v3_predictor",
    "moco_v3_projector",
]
