"""engine.recalibrate_batchnorm: precise BatchNorm statistics against a direct computation."""
import torch

from engine import Precision, recalibrate_batchnorm


def test_precise_bn_is_the_plain_average_over_the_first_batches():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4, momentum=0.1))
    bn = model[1]
    batches = [(torch.randn(2, 3, 8, 8) * (k + 1) + k, torch.zeros(2, 1, 8, 8), {}) for k in range(3)]
    model.eval()
    recalibrate_batchnorm(model, batches, Precision(torch.device("cpu")), max_batches=2)
    with torch.no_grad():
        features = [conv(images) for images, _, _ in batches[:2]]
    means = torch.stack([f.mean((0, 2, 3)) for f in features])
    variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.num_batches_tracked.item() == 2
    assert bn.momentum == 0.1 and not model.training  # momentum and mode restored
    before = bn.running_mean.clone()
    recalibrate_batchnorm(model, batches, Precision(torch.device("cpu")), max_batches=0)
    torch.testing.assert_close(bn.running_mean, before)  # 0 = off
