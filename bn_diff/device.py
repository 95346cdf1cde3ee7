"""Facts about the device a run happens on that explain differences upstream of BatchNorm.

TF32: on Ampere and later GPUs, cuDNN may run float32 convolutions with TF32 tensor cores
(`torch.backends.cudnn.allow_tf32`, True by default). The first conv's output then differs from
a float32 (or float64) conv by ~3e-4 relative instead of ~6e-7 (measured on an H200, PERF_NOTES):
a CPU/GPU divergence that starts before the first BN is usually this, not BatchNorm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .results import Finding


def device_type(tensors: Iterable[torch.Tensor]) -> str:
    """ "cuda" when any tensor is on a CUDA device, else the first one's device type ("cpu")."""
    first = "cpu"
    for i, t in enumerate(tensors):
        if t.device.type == "cuda":
            return "cuda"
        if i == 0:
            first = t.device.type
    return first


def tf32_finding(device: str, cudnn_allow_tf32: bool) -> Finding | None:
    """The run-wide note on TF32 convolutions, for a run on `device` ("cuda", "cpu", ...)."""
    if device != "cuda":
        return None
    if cudnn_allow_tf32:
        return Finding(
            "tf32_convolutions",
            "info",
            "TF32 is enabled for convolutions (torch.backends.cudnn.allow_tf32 = True): conv "
            "outputs, hence BN inputs, differ from float32 ones by ~3e-4 relative instead of "
            "~6e-7; a CPU/GPU divergence that starts upstream of BN is usually this",
            "set torch.backends.cudnn.allow_tf32 = False before comparing with a CPU run",
        )
    return Finding(
        "tf32_convolutions",
        "info",
        "TF32 is disabled for convolutions (torch.backends.cudnn.allow_tf32 = False): conv "
        "outputs are full float32, as on a CPU",
    )
