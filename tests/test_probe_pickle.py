"""A probed model can be saved, pickled and deep-copied, and no copy feeds the Probe.

Issue 11 §2: the hooks the Probe keeps in a module's hook tables travel with the module.
Each test checks the copy against an un-probed twin trained the same way (bitwise), and
the Probe's rows against a run where no copy was made.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.hooks import InertHook, ModuleHook
from reference import hook_counts


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


class _Wrapped(nn.Module):
    """A model whose body sits in a wrapper module (as DDP/compile wrap theirs)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleDict({"inner": nn.Sequential(nn.Linear(6, 8), nn.GELU())})
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body["inner"](x))


MODELS = {
    "mlp": (_mlp, (16, 6)),
    "cnn_batchnorm": (_cnn, (8, 2, 6, 6)),
    "wrapped": (_Wrapped, (16, 6)),
}


def _torch_save(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "torch_save": _torch_save,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "deepcopy": copy.deepcopy,
}


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _gradprobe_hooks(model: nn.Module) -> list[object]:
    return [
        hook
        for m in model.modules()
        for table in (m._forward_pre_hooks, m._forward_hooks)
        for hook in table.values()
        if isinstance(hook, (ModuleHook, InertHook))
    ]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("way", list(COPIES))
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_copy_made_while_probed_trains_like_an_unprobed_one_and_is_not_recorded(kind, way):
    make, shape = MODELS[kind]
    torch.manual_seed(0)
    model = make()
    before = hook_counts(model)
    twin = copy.deepcopy(model)  # never probed
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    x2 = torch.randn(*shape)

    def run(make_copy: bool):
        torch.manual_seed(1)
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        with Probe(m, opt) as probe:
            _train(m, opt, x, y, 1)
            copied = COPIES[way](m) if make_copy else None
            if copied is not None:
                copy_opt = torch.optim.SGD(copied.parameters(), lr=0.1, momentum=0.9)
                _train(copied, copy_opt, x2, y, 2)  # a copy trained while the original is probed
            _train(m, opt, x, y, 1)
            frame = probe.frame()
        return m, copied, frame

    probed, copied, frame = run(make_copy=True)
    _, _, alone = run(make_copy=False)
    # The Probe saw only the original: the same rows as when no copy existed.
    assert frame.equals(alone)
    assert sorted(frame.step.unique()) == [0, 1]
    # The copy trained exactly as an un-probed twin does.
    torch.manual_seed(1)
    reference = copy.deepcopy(twin)
    _train(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), x, y, 1)
    _train(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), x2, y, 2)
    for a, b in zip(_params(copied), _params(reference)):
        assert torch.equal(a, b)
    # After close(): the original has exactly the hooks it had, the copy none of ours.
    assert hook_counts(probed) == before
    assert _gradprobe_hooks(probed) == []
    assert _gradprobe_hooks(copied) == []
    assert hook_counts(copied) == before


@pytest.mark.parametrize("way", ["torch_save", "pickle"])
def test_a_copy_never_run_holds_only_inert_hooks_that_record_nothing(way):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt) as probe:
        copied = COPIES[way](model)
        held = _gradprobe_hooks(copied)
        assert held and all(isinstance(h, InertHook) for h in held)  # nothing live
    # The Probe is gone; the copy's inert hooks do nothing and leave at its first forward.
    out = copied(torch.randn(4, 6))
    assert out.shape == (4, 3)
    assert _gradprobe_hooks(copied) == []
    assert probe.frame().empty


def test_a_deep_copy_is_cleaned_when_the_probe_closes_without_ever_running():
    torch.manual_seed(0)
    model = _cnn()
    with Probe(model):
        copied = copy.deepcopy(model)
        assert all(isinstance(h, InertHook) for h in _gradprobe_hooks(copied))
    assert _gradprobe_hooks(copied) == []
    assert all(n == (0,) * 6 for n in hook_counts(copied).values())


def test_a_shallow_copy_shares_the_hook_tables_but_is_not_recorded():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with Probe(model) as probe:
        shallow = copy.copy(model)  # the same hook tables, another module object
        shallow(x).sum().backward()  # the shared parameters' rows are right: not checked
        probe.step()
        model(x).sum().backward()
        probe.step()
        frame = probe.frame()
    module_rows = frame[(frame.name == "") & frame.stat.isin(["calls", "act_mean", "error_norm"])]
    assert sorted(module_rows.step) == [1, 1, 1]  # the module's rows: the original's call only


def test_state_dict_is_unchanged_by_the_probe():
    torch.manual_seed(0)
    model = _cnn()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with Probe(model):
        state = model.state_dict()
        assert list(state) == list(expected)
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        other = _cnn()
        other.load_state_dict(state)
        assert _gradprobe_hooks(other) == []
        model.load_state_dict(expected)  # loading into a probed model works too
        out = model(torch.randn(2, 2, 6, 6))
    assert out.shape == (2, 3)


def test_a_model_saved_while_probed_loads_and_trains_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with Probe(model, opt):
        _train(model, opt, x, y, 2)
        torch.save(model, tmp_path / "model.pt")
        torch.save({"x": x, "y": y}, tmp_path / "data.pt")
        expected = copy.deepcopy(model)
    _train(expected, torch.optim.SGD(expected.parameters(), lr=0.1), x, y, 1)
    script = textwrap.dedent(
        f"""
        import torch
        model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        data = torch.load({str(tmp_path / "data.pt")!r})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data["x"]), data["y"]).backward()
        opt.step()
        left = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        print(left)
        torch.save(model.state_dict(), {str(tmp_path / "after.pt")!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"  # the inert hooks left at the first forward
    after = torch.load(tmp_path / "after.pt")
    for name, value in expected.state_dict().items():
        assert torch.equal(after[name], value), name
