"""Building blocks of LM-Net, one concept per module."""
from lmnet.layers.depthwise import depthwise_conv, depthwise_convs
from lmnet.layers.dropout import Dropout
from lmnet.layers.fuse import bn_scale_shift, fuse_conv_bn
from lmnet.layers.fused_norm import batchnorm_sum
from lmnet.layers.multibranch import (
    DEFAULT_BRANCHES,
    BranchSpec,
    MultiBranchBlock,
    parse_branches,
)
from lmnet.layers.native import native_status
from lmnet.layers.neighborhood_attention import (
    NeighborhoodAttention2d,
    neighborhood_attention_2d,
    neighborhood_window_index,
)
from lmnet.layers.pyramid import ConvBnAct, LocalPyramidSkip, Up2Conv, up2
from lmnet.layers.squeeze_excite import SqueezeExcite
from lmnet.layers.transformer import (
    GlobalFeatureTransformer,
    LocalFeatureTransformer,
    Mlp,
    MultiHeadSelfAttention,
)

__all__ = [
    "bn_scale_shift", "fuse_conv_bn", "DEFAULT_BRANCHES", "BranchSpec", "MultiBranchBlock",
    "parse_branches", "NeighborhoodAttention2d", "neighborhood_attention_2d",
    "neighborhood_window_index", "ConvBnAct", "LocalPyramidSkip", "Up2Conv", "up2",
    "SqueezeExcite", "GlobalFeatureTransformer", "LocalFeatureTransformer", "Mlp",
    "MultiHeadSelfAttention", "batchnorm_sum", "native_status", "depthwise_conv",
    "depthwise_convs", "Dropout",
]
