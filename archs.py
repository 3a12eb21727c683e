"""UNet and UNet++ (NestedUNet) as in 4uiiurz1/pytorch-nested-unet, plus padding helpers.

Both networks take a float batch ``x`` of shape [B, C, H, W] (C = ``input_channels``; any value range, the
scripts feed normalised images) and return raw logits [B, K, H, W] (K = ``num_classes``, unbounded; apply a
sigmoid for probabilities). H and W must be multiples of 16 (four 2x2 max-pools); :func:`pad_to_multiple`
and :func:`crop_to` handle other sizes.

Node ``Xi_j`` of the nested network sits at depth ``i`` (resolution H/2^i, ``nb_filter[i]`` channels) after
``j`` up-sampling steps; its block is the attribute ``conv{i}_{j}``, so state-dict keys match the seed's.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from utils import DataError

NB_FILTER = [32, 64, 128, 256, 512]
DEPTH = len(NB_FILTER) - 1
SIZE_MULTIPLE = 2**DEPTH


class VGGBlock(nn.Module):
    """conv3x3(padding 1) - BatchNorm - ReLU, twice: [B, in, H, W] -> [B, out, H, W] (values >= 0)."""

    def __init__(self, in_channels, middle_channels, out_channels):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, middle_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(middle_channels)
        self.conv2 = nn.Conv2d(middle_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


class Upsample2x(nn.Module):
    """Bilinear 2x up-sampling with align_corners=True (the seed's): [B, C, H, W] -> [B, C, 2H, 2W].

    Same values as ``nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)``. The gradient that
    reaches it is a channel slice of the ``torch.cat`` that follows, which in channels_last is neither NCHW- nor
    channels_last-contiguous; the CPU backward kernel then takes its generic path, about 8x slower than on a
    channels_last gradient. So, for a channels_last input, the gradient is made channels_last first.
    """

    def forward(self, x):
        out = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        if out.requires_grad and x.is_contiguous(memory_format=torch.channels_last):
            out.register_hook(to_channels_last)
        return out


def to_channels_last(grad):
    """grad [B, C, H, W] as a channels_last-contiguous tensor (a copy only when it is not one already)."""
    return grad.contiguous(memory_format=torch.channels_last)


def check_input(x, input_channels):
    """Raise DataError unless ``x`` is [B, input_channels, H, W] with H and W multiples of 16."""
    if x.dim() != 4:
        raise DataError(f"input has shape {list(x.shape)}; the model expects a batch [B, C, H, W]")
    channels, height, width = x.shape[1:]
    if channels != input_channels:
        raise DataError(
            f"input has {channels} channels but the model was built for {input_channels}: "
            f"set --input_channels {channels} or convert the images"
        )
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise DataError(
            f"input is {height}x{width}; height and width must be multiples of {SIZE_MULTIPLE}: "
            "resize (--input_h/--input_w) or pad it (archs.pad_to_multiple)"
        )


def encoder_in_channels(i, input_channels):
    """Channels entering the encoder node Xi_0: the image for i = 0, else the pooled X(i-1)_0."""
    return input_channels if i == 0 else NB_FILTER[i - 1]


class UNet(nn.Module):
    """The plain U-Net: encoder X0_0..X4_0, decoder X3_1, X2_2, X1_3, X0_4, 1x1 head ``final``.

    ``deep_supervision=True`` is refused (ValueError): UNet has a single output.
    """

    def __init__(self, num_classes, input_channels=3, deep_supervision=False):
        super().__init__()
        if deep_supervision:
            raise ValueError("deep_supervision: UNet has a single output; use NestedUNet for deep supervision")
        self.input_channels = input_channels
        self.pool = nn.MaxPool2d(2, 2)
        self.up = Upsample2x()
        for i in range(DEPTH + 1):
            setattr(self, f"conv{i}_0", VGGBlock(encoder_in_channels(i, input_channels), NB_FILTER[i], NB_FILTER[i]))
        for i in reversed(range(DEPTH)):
            in_channels = NB_FILTER[i] + NB_FILTER[i + 1]
            setattr(self, f"conv{i}_{DEPTH - i}", VGGBlock(in_channels, NB_FILTER[i], NB_FILTER[i]))
        self.final = nn.Conv2d(NB_FILTER[0], num_classes, kernel_size=1)

    def forward(self, x):
        """x [B, C, H, W] float -> logits [B, K, H, W]."""
        check_input(x, self.input_channels)
        skips = [self.conv0_0(x)]
        for i in range(1, DEPTH + 1):
            skips.append(getattr(self, f"conv{i}_0")(self.pool(skips[-1])))
        out = skips[DEPTH]
        for i in reversed(range(DEPTH)):
            out = getattr(self, f"conv{i}_{DEPTH - i}")(torch.cat([skips[i], self.up(out)], 1))
        return self.final(out)


class NestedUNet(nn.Module):
    """UNet++: nodes Xi_j for i + j <= 4; Xi_j (j >= 1) sees Xi_0..Xi_(j-1) and the up-sampled X(i+1)_(j-1).

    Without deep supervision one 1x1 head ``final`` reads X0_4; with it, heads ``final1``..``final4`` read
    X0_1..X0_4. ``forward(x, prune=L)`` (deep supervision only) runs the depth-L sub-network alone.
    """

    def __init__(self, num_classes, input_channels=3, deep_supervision=False):
        super().__init__()
        self.input_channels = input_channels
        self.deep_supervision = deep_supervision
        self.pool = nn.MaxPool2d(2, 2)
        self.up = Upsample2x()
        for j in range(DEPTH + 1):
            for i in range(DEPTH + 1 - j):
                if j == 0:
                    in_channels = encoder_in_channels(i, input_channels)
                else:
                    in_channels = NB_FILTER[i] * j + NB_FILTER[i + 1]
                setattr(self, f"conv{i}_{j}", VGGBlock(in_channels, NB_FILTER[i], NB_FILTER[i]))
        if deep_supervision:
            for level in range(1, DEPTH + 1):
                setattr(self, f"final{level}", nn.Conv2d(NB_FILTER[0], num_classes, kernel_size=1))
        else:
            self.final = nn.Conv2d(NB_FILTER[0], num_classes, kernel_size=1)

    def check_prune(self, prune):
        """Raise ValueError unless ``prune`` is None, or 1..4 on a deep-supervision model."""
        if prune is None:
            return
        if not self.deep_supervision:
            raise ValueError("prune needs the deep-supervision heads: build NestedUNet with deep_supervision=True")
        if prune not in range(1, DEPTH + 1):
            raise ValueError(f"prune must be one of 1..{DEPTH} (the head X0_L to keep), got {prune!r}")

    def top_row(self, x, depth):
        """Compute only the nodes Xi_j with i + j <= depth, diagonal by diagonal; return [X0_1..X0_depth].

        Each X0_j is [B, 32, H, W]. Node order and concatenation order are the seed's, so the values match.
        """
        rows = [[self.conv0_0(x)]]  # rows[i][j] is Xi_j
        for d in range(1, depth + 1):
            rows.append([getattr(self, f"conv{d}_0")(self.pool(rows[d - 1][0]))])
            for i in reversed(range(d)):
                j = d - i
                inputs = rows[i] + [self.up(rows[i + 1][j - 1])]
                rows[i].append(getattr(self, f"conv{i}_{j}")(torch.cat(inputs, 1)))
        return rows[0][1:]

    def forward(self, x, prune=None):
        """x [B, C, H, W] float -> logits [B, K, H, W].

        With deep supervision and ``prune=None``: a list of 4 logits tensors (heads on X0_1..X0_4). With
        ``prune=L``: only the depth-L sub-network is computed and head L's logits are returned.
        """
        self.check_prune(prune)
        check_input(x, self.input_channels)
        if prune is not None:
            return getattr(self, f"final{prune}")(self.top_row(x, prune)[-1])
        top = self.top_row(x, DEPTH)
        if self.deep_supervision:
            return [getattr(self, f"final{level}")(node) for level, node in enumerate(top, 1)]
        return self.final(top[-1])

    def pruned_modules(self, prune):
        """The blocks and the head that ``forward(x, prune=prune)`` runs."""
        self.check_prune(prune)
        blocks = [getattr(self, f"conv{i}_{j}") for i in range(prune + 1) for j in range(prune + 1 - i)]
        return blocks + [getattr(self, f"final{prune}")]


# train.py's --arch: config.ARCHS lists the same names (without importing torch, so that --help answers at once),
# and config.DEEP_SUPERVISION_ARCHS those built with deep_supervision=True (the others raise ValueError).
ARCHS = {"UNet": UNet, "NestedUNet": NestedUNet}


def final_logits(output):
    """The final head's logits [B, K, H, W] of a model's ``output``: the last of deep supervision's list of heads,
    or the one tensor of a model without it."""
    return output[-1] if isinstance(output, (list, tuple)) else output


def count_parameters(model, prune=None):
    """Number of parameters of ``model``; with ``prune=L`` only those the depth-L sub-network uses."""
    if prune is None:
        return sum(p.numel() for p in model.parameters())
    if not hasattr(model, "pruned_modules"):
        raise ValueError(f"model: {type(model).__name__} cannot be pruned; only NestedUNet with deep supervision can")
    params = {id(p): p for module in model.pruned_modules(prune) for p in module.parameters()}
    return sum(p.numel() for p in params.values())


def build_model(arch, num_classes, input_channels, deep_supervision):
    """Instantiate ``ARCHS[arch]``; an unknown name or a non-positive size is a ValueError naming the parameter."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of: {', '.join(ARCHS)}")
    if num_classes < 1 or input_channels < 1:
        raise ValueError(f"num_classes and input_channels must be at least 1, got {num_classes} and {input_channels}")
    return ARCHS[arch](num_classes, input_channels=input_channels, deep_supervision=deep_supervision)


def fold_batchnorm(model):
    """Fold every VGGBlock's BatchNorm into the conv before it, in place, for inference; returns ``model``.

    In eval mode a BatchNorm is a fixed per-channel scale and shift, so conv followed by it is one conv with
    scaled weights and a shifted bias: the same outputs up to float rounding, without a pass over every
    activation. Training needs the BatchNorm layers, so a model in training mode is refused (ValueError).
    """
    if model.training:
        raise ValueError("fold_batchnorm is for inference: call model.eval() first")
    for block in model.modules():
        if isinstance(block, VGGBlock) and isinstance(block.bn1, nn.BatchNorm2d):
            block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), nn.Identity()
            block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), nn.Identity()
    return model


def pad_to_multiple(x, multiple=SIZE_MULTIPLE):
    """Pad x [B, C, H, W] on the bottom and right to H', W' multiples of ``multiple``.

    Uses reflect padding, or replicate padding when the image is too small to reflect (pad >= size).
    Returns (padded x [B, C, H', W'], the original (H, W)) for :func:`crop_to`.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (height, width)


def crop_to(x, hw):
    """Undo :func:`pad_to_multiple`: keep the top-left hw = (H, W) of x [..., H', W']."""
    height, width = hw
    return x[..., :height, :width]
