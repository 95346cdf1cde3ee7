"""Device check for `diagnose` on CUDA: confusion matrix, CLI --device cuda, timings.

python3 bench/diagnose_device_check.py      # on a machine with a GPU, from the repo root
"""

# ruff: noqa: E402  (sys.path first: the repo, tests/ and examples/)
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]
from diagnose_cases import HYPOTHESES, TWINS, E, expected, healthy, make, pt_stats

from bn_diff.cli import main
from bn_diff.diagnose import diagnose

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
print(torch.__version__, torch.cuda.get_device_name(0) if dev == "cuda" else dev)


def sync() -> None:
    if dev == "cuda":
        sync()


def to(case):
    for k in ("x", "gamma", "beta", "rm", "rv"):
        setattr(case, k, getattr(case, k).to(dev))
    case.y_torch = F.batch_norm(
        case.x, case.rm.clone(), case.rv.clone(), case.gamma, case.beta, case.training, 0.1, 1e-5
    )
    return case


miss, n = [], 0
for shape in [(12, 5), (8, 6, 20), (4, 6, 5, 6), (16, 4, 32, 32)]:
    for training in (True, False):
        case = healthy(shape, training, 21)
        refs = {h: make(case, h) for h in HYPOTHESES}
        ycpu = case.y_torch
        case = to(case)
        for h, y in refs.items():
            if y is None:
                continue
            if h in ("matches_pytorch", "fused_activation", "quantized"):
                y = make(case, h)  # built from PyTorch's CUDA output
            n += 1
            got = diagnose(case.x, y.to(dev), **case.kwargs())
            want = expected(case, h)
            top = got[0]
            if not (
                top.hypothesis == want
                or (want in top.tied_with and top.hypothesis in TWINS.get(want, ()))
            ):
                miss.append((case.name, h, [(g.hypothesis, g.max_abs_residual) for g in got]))
print(f"{dev} confusion: {n - len(miss)}/{n} named first", *miss, sep="\n")
import contextlib
import io


def cli(argv):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            return e.code


with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    import make_examples
    import make_reference
    import models

    net = models.forum_net()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conv = net[0](x)
        y = conv * net[1].weight.view(1, -1, 1, 1) + net[1].bias.view(1, -1, 1, 1)
    torch.save(net, d / "forum.pt")
    torch.save(x, d / "in.pt")
    np.savez(d / "bn_only.npz", **{"1": y.numpy()})
    np.savez(d / "with_conv.npz", **{"1": y.numpy(), "0": conv.numpy()})
    for ref in ("bn_only.npz", "with_conv.npz"):
        code = cli(
            [
                "run",
                str(d / "forum.pt"),
                str(d / "in.pt"),
                "--trust",
                "--device",
                dev,
                "--reference",
                str(d / ref),
                "--json",
                str(d / "r.json"),
            ]
        )
        doc = json.loads((d / "r.json").read_text())
        lr = doc["layers"][0]
        print(
            ref,
            "exit",
            code,
            [(h["hypothesis"], h["max_abs_residual"]) for h in lr["diagnosis"]],
            lr["reference"].get("producer"),
            doc["reference"]["starts"],
        )
    make_examples.main(d)
    make_reference.main(d)
    code = cli(
        [
            "run",
            str(d / "small_cnn.safetensors"),
            str(d / "cnn_input.npy"),
            "--arch",
            "models:small_cnn",
            "--pythonpath",
            str(ROOT / "examples"),
            "--device",
            dev,
            "--reference",
            str(d / "theirs.npz"),
            "--json",
            str(d / "r.json"),
        ]
    )
    doc = json.loads((d / "r.json").read_text())
    print(
        f"small_cnn {dev} exit",
        code,
        doc["reference"],
        [
            (lr["name"], lr["diagnosis"][0]["hypothesis"], lr["diagnosis"][0].get("params"))
            for lr in doc["layers"]
        ],
    )
case = to(healthy((32, 64, 56, 56) if dev == "cuda" else (4, 8, 16, 16), False, 3))
mp, vp = pt_stats(case)
refs = {
    "healthy": case.y_torch.clone(),
    "eps": E(case, mp, vp, eps=1e-3).float(),
    "relu": case.y_torch.clamp_min(0),
    "noise": torch.randn_like(case.x),
}
diagnose(case.x, refs["healthy"], **case.kwargs())
for tag, y in refs.items():
    sync()
    t = time.perf_counter()
    for _ in range(3):
        r = diagnose(case.x, y, **case.kwargs())
    sync()
    dt = (time.perf_counter() - t) / 3
    print(f"{dev} {list(case.x.shape)} {tag:8s} {dt * 1000:.0f} ms -> {r[0].hypothesis}")
sync()
t = time.perf_counter()
for _ in range(10):
    F.batch_norm(case.x, case.rm, case.rv, case.gamma, case.beta, False)
sync()
print(f"plain F.batch_norm {(time.perf_counter() - t) / 10 * 1000:.2f} ms")
