"""optim.build_optimizer: the single-kernel ("fused") update, used wherever torch has it, follows torch's default
per-tensor update."""
import pytest
import torch

from optim import build_optimizer, fused_update


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_fused_update_on_the_cpu_follows_the_default_one(name):
    assert fused_update(name, "cpu") == (torch.__version__ >= "2.4")
    if not fused_update(name, "cpu"):
        pytest.skip(f"torch {torch.__version__} has no fused update on the CPU")
    torch.manual_seed(0)
    # no bias before the BatchNorm: its gradient would be rounding noise, which Adam's normalised step magnifies
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 1, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    optimizers = [build_optimizer(name, m.parameters(), 1e-2, 0.9, True, 1e-4, fused=fused)
                  for m, fused in zip(models, (False, True))]
    assert optimizers[1].param_groups[0]["fused"] and not optimizers[0].param_groups[0]["fused"]
    x = torch.randn(4, 3, 12, 12)
    for _ in range(5):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for default, fused, first in zip(models[0].parameters(), models[1].parameters(), start):
        assert not torch.equal(default, first)
        torch.testing.assert_close(fused, default, rtol=1e-5, atol=1e-6)
