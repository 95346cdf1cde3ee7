"""Write a "foreign" reference for `bn-diff run --reference`: what a port of the small CNN computes.

    python examples/make_reference.py [OUT_DIR]   # default examples/out; after make_examples.py

The port re-implements BatchNorm with Keras' default eps = 1e-3 instead of PyTorch's 1e-5, and saves
every conv and BN output by qualified module name into theirs.npz — the file a porter would write
from their own code. Then:

    bn-diff run examples/out/small_cnn.safetensors examples/out/cnn_input.npy \\
        --arch models:small_cnn --pythonpath examples --reference examples/out/theirs.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402


def foreign_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every conv and BN output of the port, by qualified name."""
    out: dict[str, np.ndarray] = {}
    hooks = [
        m.register_forward_hook(
            lambda _m, _a, y, name=name: out.__setitem__(name, y.detach().numpy().copy())
        )
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def main(out: Path) -> None:
    from safetensors.torch import load_file

    port = models.small_cnn()
    port.load_state_dict(load_file(str(out / "small_cnn.safetensors")))
    for m in port.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3  # the port's BatchNorm: Keras' default
    x = torch.from_numpy(np.load(out / "cnn_input.npy"))
    np.savez(out / "theirs.npz", **foreign_outputs(port, x))
    print(f"wrote {out / 'theirs.npz'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "out")
