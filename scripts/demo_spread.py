"""Train the demo's four models once under one perturbation; print one JSON line.

How README's demo ranges were measured: run it several times, one at a time (the
machine is shared), varying what another machine varies, e.g.

    python scripts/demo_spread.py --tag avx512
    ATEN_CPU_CAPABILITY=default python scripts/demo_spread.py --tag scalar
    ATEN_CPU_CAPABILITY=avx2 python scripts/demo_spread.py --tag avx2
    MKL_CBWR=COMPATIBLE python scripts/demo_spread.py --tag mkl-compatible
    python scripts/demo_spread.py --threads 2 --tag 2-threads
    for j in 1 2 3; do python scripts/demo_spread.py --jitter 1e-6 --jseed $j; done
    python scripts/demo_spread.py --only relu --jitter 1e-6 --jseed 7   # the chaotic one

and compare each model's numbers across the lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from gradprobe import diagnose
from gradprobe.demo import (
    BUILDERS,
    DemoConfig,
    baseline_model,
    choose_remedies,
    final_train_loss,
    train_model,
)
from gradprobe.diagnose import key_numbers
from gradprobe.lab.data import digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jitter", type=float, default=0.0, help="weights × (1 + jitter·N(0,1))")
    ap.add_argument("--jseed", type=int, default=12345, help="the jitter's generator seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=sorted(BUILDERS), help="train this remedy only")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    cfg = DemoConfig(seed=a.seed)
    data = digits(seed=a.seed)
    torch.set_num_threads(a.threads)

    def jittered(build):  # type: ignore[no-untyped-def]
        if not a.jitter:
            return build

        def build_jittered(c: DemoConfig) -> torch.nn.Module:
            model = build(c)
            g = torch.Generator().manual_seed(a.jseed)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + a.jitter * torch.randn(p.shape, generator=g))
            return model

        return build_jittered

    def row(build):  # type: ignore[no-untyped-def]
        fit = train_model(jittered(build), cfg, data, probe={"stats": "full", "every": cfg.every})
        n = key_numbers(fit.run)
        numbers = {
            "acc": round(fit.final["val_acc"], 4),
            "loss": round(final_train_loss(fit.run), 4),
            "ratio": float(f"{n['first_last_error_ratio']:.3g}"),
            "dead": round(n.get("max_dead_frac", math.nan), 3),
            "findings": ", ".join(diagnose(fit.run).kinds) or "none",
        }
        return fit, numbers

    started = time.perf_counter()
    models = {}
    if a.only:
        models[a.only] = row(BUILDERS[a.only][1])[1]
    else:
        fit, models["baseline"] = row(baseline_model)
        _, chosen = choose_remedies(diagnose(fit.run), cfg.remedies)
        for remedy in chosen:
            models[remedy.key] = row(BUILDERS[remedy.key][1])[1]
    env = {k: v for k, v in os.environ.items() if k.startswith(("ATEN_", "MKL_"))}
    print(
        json.dumps(
            {
                "tag": a.tag,
                "capability": torch.backends.cpu.get_cpu_capability(),
                "env": env,
                "models": models,
                "seconds": round(time.perf_counter() - started),
            }
        )
    )


if __name__ == "__main__":
    main()
