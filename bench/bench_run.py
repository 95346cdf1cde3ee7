"""Benchmark: `bn_diff.run` against the plain forward it checks, side by side.

    python bench/bench_run.py                 # make bench: both models, batch 1/8/32, eval+train
    python bench/bench_run.py --quick         # batch 1 and 8, 3 rounds: a few minutes
    python bench/bench_run.py --device cuda --models resnet50 --batches 64

For each model (ResNet-50-style, MobileNetV2-style; calibrated), batch and mode, one process
times a plain no_grad forward and `bn_diff.run` with each kernel policy (--kernels: the eager
pass and the compiled kernel, bn_diff/kernels.py) in turn (a warm-up round, which compiles, then
--pairs rounds) and reports the median times and the ratio to the plain forward of the same
round; wall time is the target, CPU time of the process is shown too (less sensitive to other
work on a shared machine). Peak memory is measured in fresh child processes, one per
measurement: VmHWM on CPU, the CUDA allocator's peak on a GPU. The one-time cost of compiling
is measured in fresh processes too, with an empty and with a filled inductor cache. Prints
Markdown (the machine description first); --markdown FILE writes it too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

MODELS = {"resnet50": "resnet50_style", "mobilenet": "mobilenet_style"}


def build(name: str, state: Path | None, device: str) -> Any:
    import models
    import torch

    net = getattr(models, MODELS[name])()
    if state is None:
        models.calibrate(net, (2, 3, 224, 224), batches=2)
    else:
        net.load_state_dict(torch.load(state, weights_only=True))
    return net.eval().to(device)


def forward(net: Any, x: Any, mode: str) -> None:
    import torch

    with torch.no_grad():
        net.train(mode == "train")
        net(x)
    net.eval()


def checked(net: Any, x: Any, mode: str, kernel: str) -> Any:
    import bn_diff

    return bn_diff.run(net, x, mode=mode, kernel=kernel)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Any, device: str) -> tuple[float, float]:
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w, time.process_time() - c


def time_rounds(
    net: Any, batch: int, mode: str, pairs: int, device: str, kernels: list[str]
) -> dict[str, dict[str, Any]]:
    """Per kernel policy: median plain and checked times, and the ratio of each round."""
    import torch

    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    forward(net, x, mode)  # warm-up round
    verdicts = {k: checked(net, x, mode, k) for k in kernels}  # the compiled kernel compiles here
    rows: dict[str, list[tuple[tuple[float, float], tuple[float, float]]]] = {
        k: [] for k in kernels
    }
    for _ in range(pairs):
        for k in kernels:  # a plain forward right before each checked one: noise hits both
            p = timed(lambda: forward(net, x, mode), device)
            r = timed(lambda k=k: checked(net, x, mode, k), device)  # type: ignore[misc]
            rows[k].append((p, r))
    out = {}
    for k, rs in rows.items():
        out[k] = {
            "plain": statistics.median(p[0] for p, _ in rs),
            "run": statistics.median(r[0] for _, r in rs),
            "ratio": statistics.median(r[0] / p[0] for p, r in rs),
            "ratios": [r[0] / p[0] for p, r in rs],
            "cpu_ratio": statistics.median(r[1] / p[1] for p, r in rs) if rs[0][0][1] else None,
            "ok": bool(verdicts[k]),
        }
    return out


def peak_child(
    name: str, batch: int, mode: str, what: str, state: Path, args: argparse.Namespace
) -> float:
    """Peak memory (MiB) of a fresh process that does one forward (`what` = plain, or run:KERNEL)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        what,
        "--models",
        name,
        "--batches",
        str(batch),
        "--modes",
        mode,
        "--state",
        str(state),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def compile_child(
    name: str, state: Path, args: argparse.Namespace, cache: Path
) -> dict[str, float]:
    """A fresh process with inductor's cache at `cache`: seconds of its first and second
    `run(kernel="compiled")` (batch 8, eval), and the second's eager twin."""
    cmd = [sys.executable, __file__, "--child", "compile", "--models", name, "--state", str(state)]
    cmd += ["--threads", str(args.threads), "--device", args.device, "--batches", "8"]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    net = build(args.models[0], Path(args.state), args.device)
    x = torch.randn(args.batches[0], 3, 224, 224).to(args.device)
    if args.child == "compile":
        first = timed(lambda: checked(net, x, "eval", "compiled"), args.device)[0]
        second = timed(lambda: checked(net, x, "eval", "compiled"), args.device)[0]
        eager = timed(lambda: checked(net, x, "eval", "eager"), args.device)[0]
        print(json.dumps({"first": first, "second": second, "eager": eager}))
        return
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if args.child == "plain":
        forward(net, x, args.modes[0])
    else:
        checked(net, x, args.modes[0], args.child.split(":", 1)[1])
    sync(args.device)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib()
    print(json.dumps({"peak_mib": peak}))


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM where Linux has it: ru_maxrss survives
    fork+exec, so a child would report its (large) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def help_time() -> tuple[float, float]:
    """Median wall time of `python -m bn_diff --help`, and of `python -c 'import torch'`."""

    def once(cmd: list[str]) -> float:
        t = time.perf_counter()
        subprocess.run(
            cmd,
            capture_output=True,
            check=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return time.perf_counter() - t

    helps = [once([sys.executable, "-m", "bn_diff", "--help"]) for _ in range(5)]
    torches = [once([sys.executable, "-c", "import torch"]) for _ in range(3)]
    return statistics.median(helps), statistics.median(torches)


def machine(args: argparse.Namespace) -> list[str]:
    import torch

    cpu = "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        kib = int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    lines = [
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs{mem}, {platform.system()} "
        f"{platform.release()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {args.threads}, device {args.device}",
        f"- load average at start: {' / '.join(f'{v:.2f}' for v in os.getloadavg())} "
        "(other work on the machine inflates and scatters the times)",
    ]
    if args.device.startswith("cuda"):
        lines.append(
            f"- GPU: {torch.cuda.get_device_name()}; TF32 for convolutions "
            f"(torch.backends.cudnn.allow_tf32): {torch.backends.cudnn.allow_tf32}; TF32 for "
            "matmul (torch.backends.cuda.matmul.allow_tf32): "
            f"{torch.backends.cuda.matmul.allow_tf32}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, 3 pairs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    ap.add_argument("--pairs", type=int, default=None, help="timed pairs after the warm-up (5)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2, as in the issue)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the output here")
    ap.add_argument(
        "--kernels",
        nargs="+",
        default=["eager", "compiled"],
        choices=["eager", "compiled", "auto"],
        help="kernel policies of bn_diff.run to time (bn_diff/kernels.py)",
    )
    ap.add_argument("--no-compile-cost", action="store_true", help="skip the compile-cost children")
    ap.add_argument(
        "--child",
        default=None,
        choices=["plain", "compile", *(f"run:{k}" for k in ("eager", "compiled", "auto"))],
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--state", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    args.batches = args.batches or ([1, 8] if args.quick else [1, 8, 32])
    args.pairs = args.pairs or (3 if args.quick else 5)

    import torch

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    out: list[str] = [f"## bn-diff run vs plain forward — {datetime.date.today().isoformat()}", ""]
    out += machine(args)
    cmd = " ".join(["python", "bench/bench_run.py", *sys.argv[1:]])
    out += [f"- command: `{cmd}`", ""]
    print("\n".join(out), flush=True)

    def emit(line: str) -> None:
        out.append(line)
        print(line, flush=True)

    emit(f"### Time: median of {args.pairs} rounds after a warm-up round")
    emit("")
    emit("Each round times, per kernel, a plain forward and then `bn_diff.run`; the ratio is")
    emit("the checked forward over the plain one just before it.")
    emit("")
    emit(
        "| model | batch | mode | kernel | plain (s) | bn-diff run (s) | ratio | ratio per round "
        "| CPU-time ratio |"
    )
    emit("|---|---|---|---|---|---|---|---|---|")
    states: dict[str, Path] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bn-diff-bench-"))
    for name in args.models:
        net = build(name, None, args.device)
        states[name] = tmp / f"{name}.pt"
        torch.save(net.state_dict(), states[name])
        for batch in args.batches:
            for mode in args.modes:
                res = time_rounds(net, batch, mode, args.pairs, args.device, args.kernels)
                for k, r in res.items():
                    cpu = "—" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.2f}x"
                    per = " ".join(f"{v:.2f}" for v in r["ratios"])
                    emit(
                        f"| {name} | {batch} | {mode} | {k} | {r['plain']:.3f} | {r['run']:.3f} "
                        f"| **{r['ratio']:.2f}x** | {per} | {cpu} |"
                    )
        del net
    from bn_diff import kernels

    st = kernels.status()
    emit("")
    emit(
        f"- compiled kernel: {st['compiled_layers']} layer checks used it in this process"
        + (f"; it failed: {st['failure']}" if st["failure"] else "")
    )
    if not args.no_memory:
        what = "CUDA allocator peak" if args.device.startswith("cuda") else "peak RSS (VmHWM)"
        emit("")
        emit(f"### Memory: {what} of a fresh process doing one forward")
        emit("")
        emit("| model | batch | mode | kernel | plain (MiB) | bn-diff run (MiB) | ratio |")
        emit("|---|---|---|---|---|---|---|")
        for name in args.models:
            for batch in args.batches:
                for mode in args.modes:
                    pm = peak_child(name, batch, mode, "plain", states[name], args)
                    for k in args.kernels:
                        rm = peak_child(name, batch, mode, f"run:{k}", states[name], args)
                        emit(
                            f"| {name} | {batch} | {mode} | {k} | {pm:.0f} | {rm:.0f} "
                            f"| **{rm / pm:.2f}x** |"
                        )
    if not args.no_compile_cost:
        emit("")
        emit("### One-time cost of the compiled kernel (fresh processes, batch 8, eval)")
        emit("")
        emit('First and second `run(kernel="compiled")` of a new process, then an eager run,')
        emit("with inductor's cache empty (a new machine or torch version) and then filled.")
        emit("")
        emit("| model | inductor cache | first run (s) | second run (s) | eager run (s) |")
        emit("|---|---|---|---|---|")
        for name in args.models:
            cache = Path(tempfile.mkdtemp(prefix="bn-diff-inductor-"))
            for label in ("empty", "filled"):
                c = compile_child(name, states[name], args, cache)
                emit(
                    f"| {name} | {label} | {c['first']:.2f} | {c['second']:.3f} "
                    f"| {c['eager']:.3f} |"
                )
    h, t = help_time()
    emit("")
    emit(
        f"### `bn-diff --help`: {h * 1000:.0f} ms wall (median of 5); `python -c 'import torch'` "
        f"alone takes {t * 1000:.0f} ms"
    )
    emit(f"- load average at the end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
