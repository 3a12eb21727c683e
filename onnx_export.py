"""Write a trained network as an ONNX file: the module the export keeps, the tracing exporter, and the check
against ONNX Runtime. export.py is the command line around it (see its docstring for the file's contract).

Uses PyTorch's TorchScript-based exporter (``dynamo=False``), which needs the ``onnx`` package but not
``onnxscript``; opset 17.
"""
import io
import warnings

import numpy as np
import torch

from archs import final_logits
from files import atomic_write
from utils import UserError

OPSET = 17
# torch 2.4 added the dynamo exporter and the flag that picks the TorchScript one, the only one before
TORCHSCRIPT_EXPORTER = {"dynamo": False} if torch.__version__ >= "2.4" else {}


def export_module(model, prune=None):
    """An nn.Module in eval mode returning only the logits tensor [B, K, H, W] that the export keeps: the
    final head (deep supervision), or head ``prune``."""
    class FinalHead(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return final_logits(self.net(x) if prune is None else self.net(x, prune=prune))

    # eval() on the wrapper itself: the exporter restores the wrapper's own mode afterwards, and a wrapper left
    # in training mode would put the network's BatchNorm layers back into training mode with it.
    return FinalHead(model).eval()


def export_onnx(module, example, path):
    """Trace ``module`` on ``example`` [1, C, H, W] and write ONNX (opset 17, dynamic batch/height/width)
    atomically to ``path``; returns the number of bytes written."""
    try:
        import onnx  # noqa: F401  (the TorchScript exporter needs it)
    except ImportError:
        raise UserError("exporting to ONNX needs the 'onnx' package: pip install onnx") from None
    buffer = io.BytesIO()
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the shape checks, the legacy-exporter notice
        torch.onnx.export(module, (example,), buffer, **TORCHSCRIPT_EXPORTER, opset_version=OPSET,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": dynamic, "logits": dynamic}, do_constant_folding=True)
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    with atomic_write(path, "wb") as f:
        f.write(data)
    return len(data)


def onnxruntime_difference(path, module, example):
    """Largest |ONNX Runtime - PyTorch| on ``example``, or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": example.numpy()})[0]
    with torch.no_grad():
        want = module(example).numpy()
    return float(np.abs(got - want).max())
