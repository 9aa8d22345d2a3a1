"""The Probe's statistics against independent computations, on the shared problems."""

from __future__ import annotations

import copy
import gc
import math
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import GradprobeError, Probe
from gradprobe.hooks import GradprobeWarning
from reference import capture_outputs, error_norms, hook_counts, param_grad_norms


def value(frame, step, name, stat) -> float:
    sub = frame[(frame.step == step) & (frame.name == name) & (frame.stat == stat)]
    assert len(sub) == 1, f"expected one row for {name}/{stat} at step {step}, got {len(sub)}"
    return float(sub.value.iloc[0])


def train_steps(model, x, y, loss_fn, opt, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------- gradient norms

def test_grad_norm_matches_vector_norm_of_real_grad(problem):
    model, x, y = problem.make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Probe(model, opt) as probe:
        opt.zero_grad()
        problem.loss(model(x), y).backward()
        expected = param_grad_norms(model)
        opt.step()
        frame = probe.frame()
    got = frame[frame.stat == "grad_norm"].set_index("name").value
    assert set(got.index) == set(expected)
    for name, norm in expected.items():
        assert got[name] == pytest.approx(norm, rel=1e-6, abs=1e-12)


def test_error_norm_matches_autograd_grad_of_the_output(problem):
    """error_norm = ‖dL/d(output)‖ from torch.autograd.grad on the same batch, every module."""
    model, x, y = problem.make()
    # The reference runs un-probed (autograd.grad would fire our hooks) and without in-place
    # activations (an in-place ReLU overwrites the Linear output the reference must hold).
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    with Probe(model) as probe:
        torch.manual_seed(5)
        problem.loss(model(x), y).backward()
        probe.step()
        frame = probe.frame()
        names = [m["name"] for m in probe.meta["modules"]]
    torch.manual_seed(5)
    loss, outputs, _ = capture_outputs(twin, names, lambda: problem.loss(twin(x), y))
    expected = error_norms(loss, outputs)
    got = frame[frame.stat == "error_norm"].set_index("name").value
    assert expected, "the problem has modules with an error signal"
    for name, norm in expected.items():
        assert got[name] == pytest.approx(norm, rel=1e-5, abs=1e-12), name


def test_error_gain_of_linear_is_input_over_output_error_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(10, 5)
    twin = copy.deepcopy(model)
    with Probe(model) as probe:
        model(x).pow(2).sum().backward()
        probe.step()
        frame = probe.frame()
    loss, outputs, inputs = capture_outputs(twin, ["2"], lambda: twin(x).pow(2).sum())
    dy, dx = torch.autograd.grad(loss, [outputs["2"][0], inputs["2"][0]])
    expected = float(dx.norm() / dy.norm())
    assert value(frame, 0, "2", "error_gain") == pytest.approx(expected, rel=1e-6)
    # The first Linear's input is data (no gradient): no error_gain row, no error.
    assert frame[(frame.name == "0") & (frame.stat == "error_gain")].empty


def test_error_gain_of_an_activation_is_its_gate():
    """For sigmoid at z = 0 every gate is 0.25, so the module scales the error by exactly 0.25."""
    act = nn.Sigmoid()
    z = torch.zeros(4, 3, requires_grad=True)
    with Probe(act) as probe:
        (act(z) * torch.randn(4, 3)).sum().backward()
        probe.step()
        frame = probe.frame()
    assert value(frame, 0, "", "gate_mean") == pytest.approx(0.25)
    assert value(frame, 0, "", "error_gain") == pytest.approx(0.25, rel=1e-6)


# ---------------------------------------------------------------- activations

def test_activation_statistics_match_direct_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
    x = torch.randn(20, 6)
    with Probe(model) as probe:
        out = model(x)
        out.sum().backward()
        probe.step()
        frame = probe.frame()
    h = out.detach().double()
    assert value(frame, 0, "1", "act_mean") == pytest.approx(float(h.mean()), rel=1e-6)
    assert value(frame, 0, "1", "act_std") == pytest.approx(float(h.std(unbiased=False)), rel=1e-5)
    assert value(frame, 0, "1", "zero_frac") == pytest.approx(float((h == 0).double().mean()))
    assert value(frame, 0, "1", "dead_frac") == pytest.approx(float((h == 0).all(0).double().mean()))


@pytest.mark.parametrize(("bias", "dead"), [(-100.0, 1.0), (100.0, 0.0)])
def test_dead_frac_of_relu_layer_built_dead_or_alive(bias, dead):
    torch.manual_seed(0)
    lin = nn.Linear(8, 16)
    nn.init.constant_(lin.bias, bias)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(16, 2))
    with Probe(model) as probe:
        model(torch.randn(32, 8)).sum().backward()
        probe.step()
        frame = probe.frame()
    assert value(frame, 0, "1", "dead_frac") == dead
    assert value(frame, 0, "1", "zero_frac") == dead


def test_dead_channels_are_counted_per_channel():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        conv.bias[:] = torch.tensor([-100.0, 0.0, -100.0, 0.0])
    model = nn.Sequential(conv, nn.ReLU())
    with Probe(model) as probe:
        model(torch.randn(5, 1, 6, 6)).sum().backward()
        probe.step()
        frame = probe.frame()
    # 2 of 4 channels are zero at every position of every sample.
    assert value(frame, 0, "1", "dead_frac") == 0.5


def test_dead_window_frac_needs_the_whole_window():
    torch.manual_seed(0)
    lin = nn.Linear(4, 10)
    with torch.no_grad():
        lin.bias[:5] = -100.0  # five units dead for good
        lin.bias[5:] = 100.0
    model = nn.Sequential(lin, nn.ReLU())
    with Probe(model, dead_window=3) as probe:
        for _ in range(4):
            model(torch.randn(6, 4)).sum().backward()
            probe.step()
        frame = probe.frame()
    rows = frame[(frame.name == "1") & (frame.stat == "dead_window_frac")]
    assert sorted(rows.step) == [2, 3]  # reported once 3 recorded steps are seen
    assert rows.value.tolist() == [0.5, 0.5]


def test_sat_frac_is_defined_on_the_derivative():
    sig = nn.Sequential(nn.Sigmoid())
    with Probe(sig) as probe:
        z = (torch.randint(0, 2, (64, 8)).float() * 100 - 50).requires_grad_()  # ±50
        sig(z).sum().backward()
        probe.step()
        z = (0.1 * torch.randn(64, 8)).requires_grad_()
        sig(z).sum().backward()
        probe.step()
        frame = probe.frame()
    assert value(frame, 0, "0", "sat_frac") == pytest.approx(1.0)
    assert value(frame, 1, "0", "sat_frac") == pytest.approx(0.0)
    assert value(frame, 1, "0", "gate_mean") == pytest.approx(0.25, abs=0.005)


def test_gate_of_parametrised_activations_uses_the_modules_parameters():
    act = nn.LeakyReLU(0.2)
    z = torch.tensor([[-1.0, -2.0, 3.0, 4.0]], requires_grad=True)
    with Probe(act) as probe:
        act(z).sum().backward()
        probe.step()
        frame = probe.frame()
    assert value(frame, 0, "", "gate_mean") == pytest.approx((0.2 + 0.2 + 1 + 1) / 4)


# ---------------------------------------------------------------- updates and steps

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_ratio_matches_parameters_copied_around_the_step(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with Probe(model, opt) as probe:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
        frame = probe.frame()
    for n, p in model.named_parameters():
        expected = float((p.detach() - before[n]).norm() / before[n].norm())
        assert value(frame, 2, n, "update_ratio") == pytest.approx(expected, rel=1e-5)
        assert value(frame, 2, n, "param_norm") == pytest.approx(float(before[n].norm()), rel=1e-6)


def test_update_ratio_without_optimizer_uses_probe_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    with Probe(model) as probe:
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(5, 4)).pow(2).sum().backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            probe.step()
        frame = probe.frame()
    for n, p in model.named_parameters():
        expected = float((p.detach() - before[n]).norm() / before[n].norm())
        assert value(frame, 1, n, "update_ratio") == pytest.approx(expected, rel=1e-5)


def test_every_k_records_only_those_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, every=3) as probe:
        train_steps(model, torch.randn(8, 4), torch.randint(0, 2, (8,)), nn.functional.cross_entropy, opt, 7)
        frame = probe.frame()
    assert sorted(frame.step.unique()) == [0, 3, 6]


def test_step_with_an_optimizer_is_a_clear_error():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt) as probe, pytest.raises(GradprobeError, match="optimizer"):
        probe.step()


def test_no_grad_and_eval_passes_are_not_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    with Probe(model) as probe:
        with torch.no_grad():
            model(x)
        model.eval()
        model(x).sum().backward()
        model.train()
        probe.step()
        with torch.inference_mode():
            model(x)
        probe.step()
        frame = probe.frame()
    module_rows = frame[frame.name.isin(["0", "1", "2"])]
    assert module_rows.empty


def test_module_called_twice_is_accumulated_with_its_call_count():
    from problems import PROBLEMS

    problem = next(p for p in PROBLEMS if p.name == "module_twice")
    model, x, y = problem.make()
    twin = copy.deepcopy(model)
    with Probe(model) as probe:
        problem.loss(model(x), y).backward()
        probe.step()
        frame = probe.frame()
    loss, outputs, _ = capture_outputs(twin, ["shared"], lambda: problem.loss(twin(x), y))
    expected = error_norms(loss, outputs)["shared"]
    assert value(frame, 0, "shared", "calls") == 2
    assert value(frame, 0, "shared", "error_norm") == pytest.approx(expected, rel=1e-6)
    both = torch.cat([o.detach().reshape(-1) for o in outputs["shared"]]).double()
    assert value(frame, 0, "shared", "act_mean") == pytest.approx(float(both.mean()), rel=1e-6)


def test_shared_parameter_has_one_row_and_frozen_ones_none():
    from problems import SharedWeight, _frozen_mlp

    for model, absent in ((SharedWeight(), "b.weight"), (_frozen_mlp(), "0.weight")):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with Probe(model, opt) as probe:
            opt.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
            frame = probe.frame()
        grads = frame[frame.stat == "grad_norm"]
        assert absent not in set(grads.name)
        assert grads.groupby("name").size().max() == 1


# ---------------------------------------------------------------- NaN/Inf

@pytest.mark.parametrize("stats", ["default", "full"])
def test_injected_nan_is_found_at_its_layer(stats):
    class Poison(nn.Module):
        def forward(self, x):
            return x * float("nan")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), Poison(), nn.Linear(6, 6),
                          nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, stats=stats) as probe:
        train_steps(model, torch.randn(8, 4), torch.randint(0, 2, (8,)), nn.functional.cross_entropy, opt, 1)
        run = probe.run()
    frame = run.frame()
    assert value(frame, 0, "2", "nonfinite") == 0
    # Every entry of its [8, 6] output: counted under "full", flagged (1) otherwise.
    assert value(frame, 0, "3", "nonfinite") == (8 * 6 if stats == "full" else 1)
    assert run.first_nonfinite() == (0, "3", "nonfinite")
    for name in ("6.weight", "0.weight", "0.bias"):  # .grad is still the step's
        bad = int((~torch.isfinite(model.get_parameter(name).grad)).sum())
        assert bad > 0
        assert value(frame, 0, name, "nonfinite") == (bad if stats == "full" else 1)
    assert value(frame, 0, "4", "error_nonfinite") == (8 * 6 if stats == "full" else 1)


# ---------------------------------------------------------------- robustness

def test_error_inside_a_hook_is_one_warning_and_a_gap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt) as probe:
        capture = probe._engine.capture  # the forward capture component
        original = capture.on_forward

        def broken(k, module, output):
            if probe._ctx.slots[k].name == "1":
                raise RuntimeError("boom")
            return original(k, module, output)

        capture.on_forward = broken
        twin = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        twin.load_state_dict(model.state_dict())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            losses = []
            for _ in range(3):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                losses.append(float(loss))
        frame = probe.frame()
    ours = [w for w in caught if issubclass(w.category, GradprobeWarning)]
    assert len(ours) == 1 and "boom" in str(ours[0].message)
    assert frame[frame.name == "1"].empty  # the gap
    assert not frame[frame.name == "0"].empty  # the rest is recorded
    assert all(math.isfinite(v) for v in losses)


def test_close_removes_every_hook_and_lets_the_model_go():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_counts(model)
    opt_before = (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks))
    probe = Probe(model, opt)
    assert hook_counts(model) != before
    train_steps(model, torch.randn(8, 4), torch.randint(0, 2, (8,)), nn.functional.cross_entropy, opt, 2)
    probe.close()
    probe.close()  # idempotent
    assert hook_counts(model) == before
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == opt_before
    assert not probe.frame().empty  # the record survives close
    ref = weakref.ref(model)
    del model, opt
    gc.collect()
    assert ref() is None


def test_leaving_the_with_block_by_an_exception_removes_hooks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = hook_counts(model)
    with pytest.raises(KeyError), Probe(model):
        model(torch.randn(2, 4, requires_grad=True)).sum().backward()
        raise KeyError("user error")
    assert hook_counts(model) == before


def test_a_dropped_probe_removes_its_hooks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = hook_counts(model)
    Probe(model)
    gc.collect()
    assert hook_counts(model) == before


def test_probe_leaves_loss_and_gradients_bit_for_bit(problem):
    model, x, y = problem.make(seed=3)
    twin, _, _ = problem.make(seed=3)
    with Probe(model):
        torch.manual_seed(7)
        loss = problem.loss(model(x), y)
        loss.backward()
    torch.manual_seed(7)
    twin_loss = problem.loss(twin(x), y)
    twin_loss.backward()
    assert torch.equal(loss, twin_loss)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "not a model"}, "torch.nn.Module"),
        ({"every": 0}, "every must be a positive integer"),
        ({"every": 1.5}, "every must be a positive integer"),
        ({"stats": "everything"}, "unknown statistics preset"),
        ({"stats": ["grad_norm", "nope"]}, "unknown statistics"),
        ({"modules": ["no.such"]}, "no modules named"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, match):
    args = {"model": nn.Linear(2, 2), **kwargs}
    model = args.pop("model")
    with pytest.raises(GradprobeError, match=match):
        Probe(model, **args)


def test_store_path_that_is_a_file_or_unwritable(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(GradprobeError, match="is a file"):
        Probe(nn.Linear(2, 2), store=f)
    with pytest.raises(GradprobeError, match="cannot create the run directory"):
        Probe(nn.Linear(2, 2), store=f / "run")
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    with pytest.raises(GradprobeError, match="not empty"):
        Probe(nn.Linear(2, 2), store=other)


def test_store_in_a_read_only_directory(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the file and not-a-directory cases cover the message")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(GradprobeError, match=r"not writable|cannot"):
        Probe(nn.Linear(2, 2), store=ro / "run")


def test_frame_is_long_form_with_the_contract_columns():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with Probe(model) as probe:
        model(torch.randn(4, 3)).sum().backward()
        probe.step()
        frame = probe.frame()
    assert list(frame.columns) == ["step", "name", "stat", "value"]
    assert frame.step.dtype == np.int64 and frame.value.dtype == np.float64
    assert not frame.duplicated(["step", "name", "stat"]).any()


def test_tiny_gradients_do_not_underflow_to_zero():
    """30 sigmoid layers leave the first weights a gradient around 1e-25: squares of its
    entries underflow in float32, so the norm must be accumulated in float64."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(30):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 2))
    with Probe(model) as probe:
        model(torch.randn(16, 32)).sum().backward()
        probe.step()
        frame = probe.frame()
    expected = float(model[0].weight.grad.double().norm())
    assert 0 < expected < 1e-20
    assert value(frame, 0, "0.weight", "grad_norm") == pytest.approx(expected, rel=1e-6)


def test_meta_records_what_each_modules_units_are():
    """dead_frac counts features of [N, F] and channels of [N, C, ...]: the run says which."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4), nn.ReLU())
    with Probe(model) as probe:
        model(torch.randn(2, 1, 4, 4)).sum().backward()
        probe.step()
        units = {m["name"]: m.get("units") for m in probe.run().meta["modules"]}
    assert units == {"0": "channel", "1": "channel", "2": "feature", "3": "feature", "4": "feature"}
