"""Quick start: probe a deep sigmoid MLP on the digits data and print what the probe saw.

Run:  python examples/01_quickstart.py [--out DIR]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradprobe
from gradprobe.lab.data import digits
from gradprobe.lab.models import mlp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = digits()
    model = mlp(data.in_features, 10, depth=10, width=32, activation="sigmoid")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    # The only change to a plain training loop: the `with` line.
    with gradprobe.Probe(model, opt, store=args.out, every=5):
        for _ in range(args.steps):
            idx = torch.randint(0, len(data.x_train), (64,))
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()

    run = gradprobe.load(args.out)
    last = run.steps.max()
    frame = run.frame()
    table = frame[(frame.step == last) & frame.name.str.startswith("fc")].pivot_table(
        index="name", columns="stat", values="value"
    )
    layers = [n for n in run.modules if n.startswith("fc")]
    print(f"step {last}: error signal and saturation per layer (input first)")
    print(table.loc[layers, ["error_norm", "error_gain", "act_std"]].to_string(float_format="{:.3g}".format))
    sat = run.table("sat_frac").iloc[-1]
    print("saturated fraction of each sigmoid:", " ".join(f"{v:.2f}" for v in sat.to_numpy()))
    first, last_layer = layers[0], layers[-1]
    ratio = table.loc[first, "error_norm"] / table.loc[last_layer, "error_norm"]
    print(f"{first} receives {ratio:.2g} of the error signal that {last_layer} receives")


if __name__ == "__main__":
    main()
