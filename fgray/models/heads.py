"""Projection and prediction MLPs of MoCo v2 and MoCo v3.

`mlp` follows moco-v3's `_build_mlp` (facebookresearch/moco-v3, moco/builder.py): Linear layers
joined by BatchNorm1d + ReLU, optionally a final BatchNorm1d; with batch norm the Linear layers
carry no bias (BN makes it redundant), as there. Without batch norm it is MoCo v2's
`Linear–ReLU–Linear` head (facebookresearch/moco, main_moco.py `--mlp`), with biases.
"""

from __future__ import annotations

from torch import nn

__all__ = ["mlp", "moco_v2_projector", "moco_v3_predictor", "moco_v3_projector"]


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    *,
    batch_norm: bool = True,
    last_bn: bool = False,
    last_bn_affine: bool = False,
) -> nn.Sequential:
    """`num_layers` Linear layers in_dim → hidden_dim → … → out_dim.

    Between layers: BatchNorm1d (if `batch_norm`) then ReLU. After the last layer: a
    BatchNorm1d when `last_bn` (without affine parameters unless `last_bn_affine`, as MoCo v3's
    projector). Linear layers have a bias only when `batch_norm` is off.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        d_out = out_dim if last else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=last_bn_affine))
    return nn.Sequential(*layers)


def moco_v2_projector(in_dim: int, hidden: int = 2048, dim: int = 128) -> nn.Sequential:
    """MoCo v2: `Linear(in,hidden)–ReLU–Linear(hidden,dim)` (LCR uses dim=256)."""
    return mlp(in_dim, hidden, dim, 2, batch_norm=False)


def moco_v3_projector(
    in_dim: int, hidden: int = 4096, dim: int = 256, num_layers: int = 3
) -> nn.Sequential:
    """MoCo v3 projector: Linear–BN–ReLU blocks and a final affine-free BN.

    3 layers for ViTs (as LoDisc), 2 for ResNets in moco-v3.
    """
    return mlp(in_dim, hidden, dim, num_layers, batch_norm=True, last_bn=True)


def moco_v3_predictor(dim: int = 256, hidden: int = 4096, last_bn: bool = False) -> nn.Sequential:
    """MoCo v3 predictor: `Linear–BN–ReLU–Linear`, dim → hidden → dim; moco-v3 adds a final
    affine-free BN for ViTs (`last_bn=True`) and none for ResNets."""
    return mlp(dim, hidden, dim, 2, batch_norm=True, last_bn=last_bn)
