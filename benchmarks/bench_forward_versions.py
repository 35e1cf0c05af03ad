"""The denoiser's inference forward, this checkout against others, side by side in one run.

The forward ``predict`` runs per batch (2 tiles x the feature timesteps, channels_last_3d, float32,
``torch.inference_mode``, feature taps without the output convolution), with random weights (timing
and agreement do not depend on them). Each code version runs in its own subprocess with its
checkout first on PYTHONPATH (``--code``: e.g. a ``git worktree`` of an older commit, as
``bench_memory.py`` does); the versions alternate, ``--rounds`` times, so a change in load hits
them alike. Printed per version and size class: min / median ms per forward, and the largest
relative difference of the feature taps from the first version (the same seed builds the same net).

    git worktree add /tmp/dp_before <commit> && \\
    python benchmarks/bench_forward_versions.py --code /tmp/dp_before --size_classes tiny cpu --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def worker(size_class: str, threads: int, repeats: int, out: Path) -> None:
    """Time the forward and save the feature taps (runs in the subprocess)."""
    import time

    import torch
    from bench_features import load_plans

    from diffprobe.planning.view import Plans
    from diffprobe.pretraining.pretrained_model import build_denoiser

    torch.set_num_threads(threads)
    plans = Plans(load_plans(None, size_class))
    ts = plans.feature_timesteps
    torch.manual_seed(0)
    net = build_denoiser(plans, "physical", "planned").eval()
    with torch.no_grad():
        for p in net.parameters():  # non-zero everywhere (the residual branches start at zero)
            p.normal_(0, 0.05)
    fmt = torch.channels_last_3d
    net = net.to(memory_format=fmt)
    b = 2 * len(ts)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((b, 1, *plans.patch_size), generator=gen).contiguous(memory_format=fmt)
    g = torch.rand((b, 3, *plans.patch_size), generator=gen).contiguous(memory_format=fmt)
    t = torch.tensor(ts * 2)

    def forward() -> dict:
        with torch.inference_mode():
            return net(x, t, g, return_features=True, return_output=False)[1]

    feats = forward()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    torch.save({k: v.clone() for k, v in feats.items()}, out.with_suffix(".pt"))
    out.write_text(json.dumps({"seconds": times}))


def run_version(code: Path, size_class: str, threads: int, repeats: int, out: Path) -> list[float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(HERE)]), OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", size_class, str(threads),
                    str(repeats), str(out)], env=env, check=True)
    return json.loads(out.read_text())["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", type=Path, nargs="*", default=[], help="other checkouts, measured after this one")
    ap.add_argument("--size_classes", nargs="+", default=["tiny", "cpu"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="forwards timed per subprocess")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sc, threads, repeats, out = args.worker
        worker(sc, int(threads), int(repeats), Path(out))
        return
    import torch

    versions = [REPO, *[c.resolve() for c in args.code]]
    with tempfile.TemporaryDirectory() as tmp:
        for sc in args.size_classes:
            for threads in args.threads:
                times: dict[int, list[float]] = {i: [] for i in range(len(versions))}
                for _ in range(args.rounds):
                    for i, code in enumerate(versions):
                        times[i] += run_version(code, sc, threads, args.repeats, Path(tmp) / f"v{i}.json")
                ref = torch.load(Path(tmp) / "v0.pt", weights_only=True)
                for i, code in enumerate(versions):
                    got = torch.load(Path(tmp) / f"v{i}.pt", weights_only=True)
                    rel = max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)
                    ts = sorted(times[i])
                    print(f"{sc:<6} threads {threads}  {str(code):<28} min {ts[0] * 1e3:7.0f} ms  median "
                          f"{ts[len(ts) // 2] * 1e3:7.0f} ms  ratio to this checkout {ts[0] / sorted(times[0])[0]:.2f}"
                          f"  rel. diff {rel:.1e}", flush=True)


if __name__ == "__main__":
    main()
