"""gate_mean and sat_frac of every activation module against f'(z) computed by hand from
the module's real input z in float64: whether the Probe reads the gate from z (most
activations) or from the output y = f(z) (stock ReLU, tanh and sigmoid, in place or not),
and a subclass whose forward does more than its activation."""

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.activations import activation_of
from gradprobe.stats import SAT_THRESHOLD


class DoubledReLU(nn.ReLU):
    """A ReLU subclass whose output is not relu(z): its gate must be read from z."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


def _by_hand(act_module: nn.Module, z: torch.Tensor) -> tuple[float, float | None]:
    act = activation_of(act_module)
    gate = act.gate(z.double(), act.params(act_module))
    # Saturation is |f'(z)| small (issue 22 §4): GELU's and SiLU's negative dip is not.
    small = gate.abs() < SAT_THRESHOLD * act.max_derivative
    sat = small.double().mean() if act.saturates else None
    return float(gate.mean()), (float(sat) if sat is not None else None)


ACTIVATIONS = [
    lambda: nn.ReLU(),
    lambda: nn.ReLU(inplace=True),
    lambda: nn.Tanh(),
    lambda: nn.Sigmoid(),
    lambda: nn.LeakyReLU(0.1),
    lambda: nn.ELU(),
    lambda: nn.GELU(),
    lambda: DoubledReLU(),
]


@pytest.mark.parametrize("make", ACTIVATIONS)
@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])  # from linear to deeply saturated
# (160, 512): 81920 entries, over HELD_NUMEL: reduced alone in its hook, its saturation
# counted chunk by chunk (reduce.outside_count).
@pytest.mark.parametrize("shape", [(64, 48), (8, 6, 5, 7), (160, 512)])
def test_gate_statistics_match_the_derivative_at_the_real_input(make, scale, shape):
    torch.manual_seed(0)
    act = make()
    pre = nn.Linear(shape[-1], shape[-1])
    with torch.no_grad():
        pre.weight.mul_(scale)
    model = nn.Sequential(pre, act, nn.Linear(shape[-1], 1))
    x = torch.randn(shape)
    with torch.no_grad():
        z = pre(x)  # what the activation will read
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Probe(model, opt) as probe:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        frame = probe.frame()
    rows = frame[(frame.name == "1") & (frame.step == 0)].set_index("stat").value
    gate_mean, sat_frac = _by_hand(act, z)
    assert rows["gate_mean"] == pytest.approx(gate_mean, rel=1e-5, abs=1e-7)
    if sat_frac is None:
        assert "sat_frac" not in rows
    else:
        assert rows["sat_frac"] == pytest.approx(sat_frac, abs=1.5 / z.numel())


@pytest.mark.parametrize("make", ACTIVATIONS)
def test_gate_statistics_of_many_layers_of_one_shape(make):
    """Several activations of one output shape: reduced together once their outputs are
    known to stay as they were (from the second step), still f'(z) at their real input."""
    torch.manual_seed(1)
    width, layers = 24, 4
    modules: list[nn.Module] = []
    for _ in range(layers):
        pre = nn.Linear(width, width)
        with torch.no_grad():
            pre.weight.mul_(3.0)
        modules += [pre, make()]
    model = nn.Sequential(*modules, nn.Linear(width, 1))
    xs = [torch.randn(16, width) for _ in range(3)]
    inputs: list[dict[str, torch.Tensor]] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Probe(model, opt) as probe:
        for x in xs:
            z_by_act: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                h = x
                for i, m in enumerate(model):
                    if activation_of(m) is not None:
                        z_by_act[str(i)] = h.clone()
                    h = m(h.clone())
            inputs.append(z_by_act)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        frame = probe.frame()
    for step, z_by_act in enumerate(inputs):
        for name, z in z_by_act.items():
            rows = frame[(frame.name == name) & (frame.step == step)].set_index("stat").value
            gate_mean, sat_frac = _by_hand(model[int(name)], z)
            assert rows["gate_mean"] == pytest.approx(gate_mean, rel=1e-5, abs=1e-7), (step, name)
            if sat_frac is not None:
                assert rows["sat_frac"] == pytest.approx(sat_frac, abs=1.5 / z.numel()), (step, name)
