"""Export a model to ONNX and save what `bn-diff check` compares it with (run by check_export.sh).

    python examples/ci/export_model.py OUT_DIR

Writes OUT_DIR/model.onnx (dynamo exporter: BatchNorm folded into the convs), OUT_DIR/model.pt
(the eager model's state_dict; its factory is `models:resnet_tiny`) and OUT_DIR/input.pt.
In your project this is your own export step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = models.calibrate(models.resnet_tiny(), (8, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(model.state_dict(), out / "model.pt")
    torch.save(x, out / "input.pt")
    torch.onnx.export(model, (x,), str(out / "model.onnx"), dynamo=True, external_data=False)
    print(f"exported {out / 'model.onnx'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out"))
