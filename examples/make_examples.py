"""Write the example files `make demo` runs bn-diff on (model weights are made here, never downloaded).

    python examples/make_examples.py [OUT_DIR]      # default: examples/out

(a) forum_model.pt + forum_input.pt — the forum case of DESIGN.md: Conv2d(3, 2) -> BatchNorm2d(2),
    weight [0.8352, 0.2056], bias [0, 0], left in train mode; a pickled nn.Module (needs --trust).
(b) small_cnn.safetensors + cnn_input.npy — a small CNN whose running statistics were calibrated
    on synthetic data, saved as a state_dict; its factory is `models:small_cnn` (eval mode).
(c) theirs.npz — what a port of that CNN with Keras' eps computes (make_reference.py), for
    `bn-diff run ... --reference`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    forum = models.forum_net()
    torch.save(forum, out / "forum_model.pt")
    torch.save(
        torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), out / "forum_input.pt"
    )

    cnn = models.calibrate(models.SmallCNN(), (16, 3, 32, 32))
    from safetensors.torch import save_file

    save_file(cnn.state_dict(), str(out / "small_cnn.safetensors"))
    torch.save(cnn.state_dict(), out / "small_cnn.pt")
    x = np.random.default_rng(2).normal(0.2, 1.5, size=(4, 3, 32, 32)).astype(np.float32)
    np.save(out / "cnn_input.npy", x)
    import make_reference

    make_reference.main(out)
    print(f"wrote examples to {out}/")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "out")
