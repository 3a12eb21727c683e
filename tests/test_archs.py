"""Tests for archs.py: parameter fingerprints, shapes, input checks, pruning and padding. CPU, 32x32 inputs.

The tests parametrized over ``archs.ARCHS`` are what train.py, val.py, predict.py and export.py rely on of every
network: one added to the registry is checked by them without further edits here.
"""
import copy
import re

import pytest
import torch
from torch import nn

import archs
import config
from archs import (NestedUNet, UNet, Upsample2x, VGGBlock, build_model, count_parameters, crop_to, final_logits,
                   pad_to_multiple)
from config import DEEP_SUPERVISION_ARCHS, parse_train_args
from utils import DataError, UsageError

SIZE_MESSAGE = (
    "input is 30x32; height and width must be multiples of 16: "
    "resize (--input_h/--input_w) or pad it (archs.pad_to_multiple)"
)


@pytest.fixture(scope="module")
def ds_model():
    torch.manual_seed(0)
    return NestedUNet(1, deep_supervision=True).eval()


def test_parameter_fingerprints_match_the_seed():
    assert count_parameters(UNet(1)) == 7_852_545
    assert count_parameters(NestedUNet(1)) == 9_163_329
    assert count_parameters(NestedUNet(1, deep_supervision=True)) == 9_163_428


def test_state_dict_keys_follow_the_seed_naming():
    keys = NestedUNet(1, deep_supervision=True).state_dict().keys()
    assert {"conv0_0.conv1.weight", "conv2_2.bn2.running_mean", "conv0_4.conv2.bias", "final4.weight"} <= set(keys)
    assert "final.weight" in UNet(1).state_dict()
    assert "conv1_3.conv1.weight" in UNet(1).state_dict()


def test_unet_output_shape():
    out = UNet(1)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1, 32, 32)


def test_nested_unet_multiclass_grey_output_shape():
    out = NestedUNet(3, input_channels=1)(torch.randn(1, 1, 32, 32))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 3, 32, 32)


def test_deep_supervision_returns_four_heads(ds_model):
    outs = ds_model(torch.randn(1, 3, 32, 16))
    assert isinstance(outs, list) and len(outs) == 4
    assert all(out.shape == (1, 1, 32, 16) for out in outs)


def test_unet_refuses_deep_supervision():
    with pytest.raises(ValueError, match="deep_supervision: UNet has a single output"):
        UNet(1, deep_supervision=True)


def heads(output):
    """The logits tensors of a model's output: the list of deep supervision's heads, or the one tensor."""
    return output if isinstance(output, list) else [output]


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_every_arch_gives_logits_of_the_input_size_and_trains_every_parameter(arch):
    torch.manual_seed(0)
    for deep_supervision in (False, True) if arch in DEEP_SUPERVISION_ARCHS else (False,):
        model = build_model(arch, 2, 1, deep_supervision)
        output = model(torch.randn(2, 1, 32, 48))
        assert all(out.shape == (2, 2, 32, 48) for out in heads(output)), (arch, deep_supervision)
        assert final_logits(output).shape == (2, 2, 32, 48)
        sum(out.mean() for out in heads(output)).backward()
        untrained = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
        assert not untrained, (arch, deep_supervision, untrained[:3])


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_deep_supervision_is_refused_exactly_where_config_refuses_it(arch):
    """A network outside config.DEEP_SUPERVISION_ARCHS must refuse deep_supervision=True (one silently building a
    single head would train a run that its config.yml, its name and train.py's first line call deep-supervised)."""
    argv = ["--arch", arch, "--deep_supervision", "True"]
    if arch in DEEP_SUPERVISION_ARCHS:
        assert len(heads(build_model(arch, 1, 3, True)(torch.randn(1, 3, 32, 32)))) > 1
        assert parse_train_args(argv).deep_supervision
    else:
        with pytest.raises(ValueError, match="deep_supervision"):
            build_model(arch, 1, 3, True)
        with pytest.raises(UsageError, match=f"^{arch} has no deep supervision; use --arch NestedUNet or "):
            parse_train_args(argv)


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_size_not_multiple_of_16_is_refused_before_any_conv(arch):
    model = build_model(arch, 1, 3, False)
    convs_run = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(lambda module, inputs: convs_run.append(module))
    with pytest.raises(DataError) as info:
        model(torch.randn(1, 3, 30, 32))
    assert str(info.value) == SIZE_MESSAGE
    assert convs_run == []


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_wrong_channel_count_names_the_flag(arch):
    with pytest.raises(DataError, match="--input_channels 1"):
        build_model(arch, 1, 3, False)(torch.randn(1, 1, 32, 32))


def test_prune_equals_the_matching_head_of_the_full_forward(ds_model):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = ds_model(x)
        for level in range(1, 5):
            pruned = ds_model(x, prune=level)
            assert pruned.shape == (1, 1, 32, 32)
            assert torch.allclose(pruned, full[level - 1], atol=1e-6), level


def test_prune_runs_exactly_the_counted_parameters(ds_model):
    x = torch.randn(1, 3, 32, 32)
    for level in range(1, 5):
        ds_model.zero_grad(set_to_none=True)
        ds_model(x, prune=level).sum().backward()
        used = sum(p.numel() for p in ds_model.parameters() if p.grad is not None)
        assert used == count_parameters(ds_model, prune=level), level
    ds_model.zero_grad(set_to_none=True)


def test_pruned_parameter_counts(ds_model):
    counts = [count_parameters(ds_model, prune=level) for level in range(1, 5)]
    assert counts == sorted(set(counts))  # strictly increasing
    # L = 1: conv0_0 (3->32->32): 3*32*9+32 + 2*32 + 32*32*9+32 + 2*32 = 10,272
    #        conv1_0 (32->64->64): 32*64*9+64 + 128 + 64*64*9+64 + 128 = 55,680
    #        conv0_1 (96->32->32): 96*32*9+32 + 64 + 32*32*9+32 + 64 = 37,056;  final1: 32+1 = 33
    assert counts[0] == 10_272 + 55_680 + 37_056 + 33
    # L = 4 uses every block and only one of the four heads.
    assert counts[3] == 9_163_428 - 3 * 33
    assert count_parameters(ds_model) == 9_163_428


def test_prune_needs_deep_supervision_and_a_valid_level(ds_model):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="deep_supervision=True"):
        NestedUNet(1)(x, prune=2)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="prune must be one of 1..4"):
            ds_model(x, prune=bad)
    with pytest.raises(ValueError, match="cannot be pruned"):
        count_parameters(UNet(1), prune=2)


def test_build_model_registry_and_unknown_arch():
    assert list(archs.ARCHS) == list(config.ARCHS), "--arch's choices: name each network of archs.ARCHS in " \
        "config.ARCHS too, in the same order"
    assert set(DEEP_SUPERVISION_ARCHS) <= set(config.ARCHS)
    model = build_model("NestedUNet", 2, 1, True)
    assert isinstance(model, NestedUNet) and model.deep_supervision and model.final4.out_channels == 2
    assert model.conv0_0.conv1.in_channels == 1
    with pytest.raises(ValueError, match=re.escape(f"arch 'UNet++' is not one of: {', '.join(archs.ARCHS)}")):
        build_model("UNet++", 1, 3, False)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("UNet", 0, 3, False)


def test_pad_to_multiple_reflects_and_crop_to_undoes_it():
    x = torch.randn(1, 2, 20, 33)
    padded, hw = pad_to_multiple(x)
    assert padded.shape == (1, 2, 32, 48) and hw == (20, 33)
    assert torch.equal(padded[..., 20, :33], x[..., 18, :])  # reflect: row H mirrors row H-2
    assert torch.equal(padded[..., :20, 33], x[..., :, 31])
    assert torch.equal(crop_to(padded, hw), x)


def test_pad_to_multiple_replicates_when_too_small_and_keeps_multiples():
    x = torch.randn(1, 1, 5, 16)
    padded, hw = pad_to_multiple(x)
    assert padded.shape == (1, 1, 16, 16) and hw == (5, 16)
    assert torch.equal(padded[..., 15, :], x[..., 4, :])
    assert torch.equal(crop_to(padded, hw), x)
    same, hw = pad_to_multiple(torch.zeros(1, 1, 32, 16))
    assert same.shape == (1, 1, 32, 16) and hw == (32, 16)


def test_padded_input_runs_through_the_model_and_crops_back():
    x = torch.randn(1, 3, 20, 17)
    padded, hw = pad_to_multiple(x)
    out = crop_to(UNet(2).eval()(padded), hw)
    assert out.shape == (1, 2, 20, 17)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample2x_matches_nn_upsample_in_values_and_gradients(channels_last):
    """The channels_last gradient is a layout change only: outputs and input gradients equal the seed's
    nn.Upsample. Behind a channel slice of a cat (the gradient the model gives it), the gradient that reaches
    the interpolation is channels_last-contiguous for a channels_last input."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 10)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    skip = torch.randn(2, 4, 12, 20)
    weights = torch.arange(12.0).view(1, 12, 1, 1)
    results = {}
    for name, up in (("seed", nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)),
                     ("ours", Upsample2x())):
        xi = x.detach().clone().requires_grad_()
        out = up(xi)
        reached = []
        out.register_hook(reached.append)  # runs after Upsample2x's own hook: sees what the kernel gets
        torch.cat([skip, out], 1).mul(weights).sum().backward()
        results[name] = (out.detach(), xi.grad, reached[0])
    torch.testing.assert_close(results["ours"][0], results["seed"][0], rtol=0, atol=0)
    torch.testing.assert_close(results["ours"][1], results["seed"][1], rtol=1e-6, atol=1e-6)
    assert results["ours"][2].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert not results["seed"][2].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_fold_batchnorm_keeps_the_eval_outputs(arch):
    """Folded into the convs, BatchNorm with non-trivial statistics gives the eval-mode outputs to fp32 rounding
    (val.py and predict.py run every network folded)."""
    torch.manual_seed(0)
    ds = arch in DEEP_SUPERVISION_ARCHS
    model = archs.build_model(arch, 1, 3, ds)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        folded = archs.fold_batchnorm(copy.deepcopy(model))
        got = folded(x)
    assert not any(isinstance(m, VGGBlock) and isinstance(m.bn1, nn.BatchNorm2d) for m in folded.modules())
    for e, g in zip(expected if ds else [expected], got if ds else [got]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="model.eval"):
        archs.fold_batchnorm(archs.build_model("UNet", 1, 3, False))
