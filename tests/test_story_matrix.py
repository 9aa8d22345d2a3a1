"""The story matrix (issue 22, "Done when"): runs whose right advice is known, each trained as
a user trains it, diagnosed, and checked for its root cause, its first action, and that no
action the same run contradicts is offered at all; healthy twins get no warning.

What "contradicted" means is read here from the run and the model themselves, not from
gradprobe's own verdicts: the largest ‖Δw‖/‖w‖ in the recorded update ratios, whether
clipping shortened any step (pre-clip norm above the post-clip one), and which module
classes the model holds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import architectures as A
import story_models as S
from gradprobe import Probe, diagnose
from gradprobe.demo import choose_remedies
from gradprobe.diagnose import Findings
from gradprobe.lab.data import digits
from gradprobe.lab.models import mlp
from gradprobe.run import Run

torch.set_num_threads(1)
FLOW = {"nonfinite", "exploding", "vanishing", "saturation", "dead_units", "dead_channels"}


# ------------------------------------------------------------------ the runs
@functools.lru_cache(maxsize=1)
def _digits() -> Any:
    return digits(seed=0)


def _loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    sched: Any = None,
    clip: float | None = None,
    config: dict[str, Any] | None = None,
) -> Run:
    with Probe(model, opt, config=config) as probe:
        for s in range(steps):
            x, y = batches(s)
            out = model(x)
            loss = nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if sched is not None:
                sched.step()
            probe.log(loss=loss)
    return probe.run()


def _gpt(lr: float, warmup: int = 0, steps: int = 60) -> tuple[Run, nn.Module]:
    torch.manual_seed(0)
    model = S.TinyGPT(depth=4)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    if warmup:
        ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        sched: Any = torch.optim.lr_scheduler.ChainedScheduler([ramp, cosine])
    else:
        sched = cosine
    data = A.token_sequences(32 * steps, 17, seed=1)  # x[t] = x[t-1] + x[t-2] mod 32

    def batch(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = data[s * 32 : (s + 1) * 32]
        return x[:, :-1], x[:, 1:]

    return _loop(model, opt, batch, steps, sched=sched), model


def _digit_batches(
    images: bool = False, seed: int = 0
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    d = _digits()
    x = d.x_train.reshape(-1, 1, 8, 8) if images else d.x_train
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(x), (10_000,), generator=g)

    def batch(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = order[s * 32 : (s + 1) * 32]
        return x[i], d.y_train[i]

    return batch


def _cnn(dead_bias: bool) -> tuple[Run, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )
    for m in model:
        if isinstance(m, nn.Conv2d):  # He init for ReLU convs, as a user would
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    if dead_bias:
        with torch.no_grad():
            model[2].bias.fill_(-10.0)
            model[2].weight.mul_(0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return _loop(model, opt, _digit_batches(images=True), 40), model


def _deep_mlp(
    activation: str,
    lr: float,
    steps: int,
    init: str = "he",
    depth: int = 20,
    seed: int = 0,
    **kw: Any,
) -> tuple[Run, nn.Module]:
    torch.manual_seed(seed)
    model = mlp(64, 10, depth=depth, width=32, activation=activation, init=init)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return _loop(model, opt, _digit_batches(seed=seed), steps, **kw), model


RUNS: dict[str, Callable[[], tuple[Run, nn.Module]]] = {
    # the example: a plain-PyTorch Transformer at AdamW lr 0.1, no warmup
    "gpt_lr_too_high": lambda: _gpt(0.1),
    "gpt_healthy": lambda: _gpt(1e-2, warmup=10),
    # a conv whose bias was set to −10 (and tiny weights): every channel after it dead
    "cnn_dead_bias": lambda: _cnn(True),
    "cnn_healthy": lambda: _cnn(False),
    # the demo's model: a 20-layer sigmoid MLP at PyTorch's default init
    "sigmoid_deep": lambda: _deep_mlp("sigmoid", 0.1, 40, init="default"),
    # a 20-layer ReLU MLP at too high a rate: the loss keeps jumping back
    **{
        f"relu_deep_high_lr_{seed}": functools.partial(_deep_mlp, "relu", 0.1, 300, seed=seed)
        for seed in range(3)
    },
    "relu_shallow_healthy": lambda: _deep_mlp("relu", 0.05, 120, depth=3),
    # clipping acting on every step, the rate still far too high
    "tanh_clipped_high_lr": lambda: _deep_mlp("tanh", 3.0, 60, depth=4, clip=0.01),
    # GELU MLP, healthy: its negative dip is no saturation
    "gelu_healthy": lambda: _deep_mlp("gelu", 0.05, 60, depth=4),
}


@functools.cache
def story(name: str) -> tuple[Run, nn.Module, Findings]:
    run, model = RUNS[name]()
    return run, model, diagnose(run)


# ------------------------------------------------------------------ independent checks
def largest_update(run: Run) -> float:
    """The largest ‖Δw‖/‖w‖ of any weight matrix over the run, from the recorded rows."""
    table = run.table("update_ratio")
    weights = [p["name"] for p in run.meta["parameters"] if len(p["shape"]) >= 2]
    values = table[[w for w in weights if w in table.columns]].to_numpy(dtype=float)
    return float(np.nanmax(np.where(np.isfinite(values), values, np.nan)))


def clipping_shortened(run: Run) -> bool:
    pre = run.model_series("global_grad_norm_preclip")
    post = run.model_series("global_grad_norm").reindex(pre.index)
    return bool(((post < pre * (1 - 1e-4)) & (pre > 0)).any())


# Remedies that add what the model already has, by the module classes it holds.
ALREADY = {
    "batchnorm": (nn.BatchNorm1d, nn.BatchNorm2d),
    "layernorm": (nn.LayerNorm,),
    "silu_gelu": (nn.GELU, nn.SiLU),
    "relu": (nn.ReLU,),
    "lstm_gru": (nn.LSTM, nn.GRU),
}


def assert_no_contradiction(run: Run, model: nn.Module, findings: Findings) -> None:
    offered = {(f.kind, r.key) for f in findings for r in f.remedies}
    keys = {k for _, k in offered}
    if run.stats and "update_ratio" in run.stats and largest_update(run) >= 0.1:
        assert "raise_lr" not in keys, offered
    if clipping_shortened(run):
        assert "grad_clipping" not in keys, offered
    for key, classes in ALREADY.items():
        if any(isinstance(m, classes) for m in model.modules()):
            assert key not in keys, (key, offered)
    for f in findings:
        for r in f.remedies:
            compile(r.code, f"<{r.key}>", "exec")  # valid Python when pasted


def root(findings: Findings) -> Any:
    assert findings and findings[0].cause is None
    return findings[0]


# ------------------------------------------------------------------ own cases
def test_transformer_at_a_far_too_high_rate_is_told_to_lower_it() -> None:
    run, model, found = story("gpt_lr_too_high")
    assert run.meta["architecture"]["kind"] == "transformer"  # its attention class is Attn
    first = root(found)
    assert first.kind in ("exploding", "unstable_updates"), found.kinds
    assert largest_update(run) >= 1.0  # updates as large as the weights: the evidence
    assert first.remedies[0].key == "lower_peak_lr"
    assert "torch.optim.AdamW(" in first.remedies[0].code
    assert "lr_warmup" in [r.key for r in first.remedies[:3]]
    keys = {r.key for f in found for r in f.remedies}
    assert not {"raise_lr", "grad_clipping", "relu", "batchnorm", "leaky_relu"} & keys
    # everything else found follows from it
    assert all(f.cause == first.kind for f in found[1:]), [(f.kind, f.cause) for f in found]
    assert set(first.consequences) == {f.kind for f in found[1:]}
    assert_no_contradiction(run, model, found)


def test_dead_conv_says_what_its_numbers_say() -> None:
    run, model, found = story("cnn_dead_bias")
    first = root(found)
    assert first.kind == "dead_channels"
    fix = first.remedies[0]
    assert fix.key == "fix_preactivation" and "`2`" in fix.name
    # The conv's output, computed here on an un-probed forward of a batch: all below 0.
    with torch.no_grad():
        z = model[:3](_digit_batches(images=True)(0)[0])
    numbers = first.evidence["negative_preactivation"]["2"]
    assert float(z.max()) < 0
    # float32 mean of ~16k values near −10: 1e-3 covers accumulation error and the
    # median over recent steps of means that differ by batch only in the 4th digit.
    assert numbers["mean"] == pytest.approx(float(z.mean()), abs=1e-2)
    assert "every pre-activation of `2` is negative" in first.summary.lower().replace(
        "Every", "every"
    )
    assert "model.get_submodule('2')" in fix.code
    keys = [r.key for f in found for r in f.remedies]
    assert "pretraining" not in keys
    for f in found[1:]:
        assert f.cause == "dead_channels", (f.kind, f.cause)
    batchnorm = next((r for f in found for r in f.remedies if r.key == "batchnorm"), None)
    assert batchnorm is None or "BatchNorm2d" in batchnorm.code
    sgd = [r for f in found for r in f.remedies if "torch.optim.SGD(" in r.code]
    assert not sgd  # an AdamW run gets AdamW code
    assert_no_contradiction(run, model, found)


def test_deep_sigmoid_mlp_vanishes_and_gets_relu_batchnorm_residual() -> None:
    run, model, found = story("sigmoid_deep")
    first = root(found)
    assert first.kind == "vanishing"
    assert first.remedies[0].key == "relu"
    _, chosen = choose_remedies(found, 3)  # the demo's pick
    assert {r.key for r in chosen} == {"relu", "batchnorm", "residual"}
    assert_no_contradiction(run, model, found)


def test_deep_relu_at_too_high_a_rate_is_unstable_and_never_told_to_raise_it() -> None:
    unstable = 0
    for seed in range(3):  # the jumps fall where the batches put them: three seeds
        run, model, found = story(f"relu_deep_high_lr_{seed}")
        unstable += "loss_instability" in found.kinds
        if found:
            first = root(found)
            assert first.kind in ("loss_instability", "grad_norm_spike", "exploding", "divergence")
            assert first.remedies[0].key in ("lr_schedule", "grad_clipping")
        spike = found.of("grad_norm_spike")
        if spike is not None:  # it names parameters, not "(model)"
            assert set(spike.names) <= {p["name"] for p in run.meta["parameters"]}
        assert "raise_lr" not in {r.key for f in found for r in f.remedies}
        assert_no_contradiction(run, model, found)
    assert unstable >= 2


def test_clipping_that_already_acts_is_never_proposed() -> None:
    run, model, found = story("tanh_clipped_high_lr")
    assert clipping_shortened(run)
    assert found, "a rate of 3 with clipping at 0.01 on every step is not healthy"
    assert "grad_clipping" not in {r.key for f in found for r in f.remedies}
    assert_no_contradiction(run, model, found)


@pytest.mark.parametrize(
    "name", ["gpt_healthy", "cnn_healthy", "relu_shallow_healthy", "gelu_healthy"]
)
def test_healthy_twins_get_no_warning(name: str) -> None:
    run, _model, found = story(name)
    assert [(f.kind, f.severity) for f in found if f.severity != "info"] == []
    losses = run.model_series("loss")
    assert losses.iloc[-10:].median() < 0.95 * losses.iloc[:5].median()  # they learn


# ------------------------------------------------------------------ real architectures
REAL: dict[str, tuple[str, str | None]] = {
    # setting: (root kind, its first action; None: any not contradicted)
    "resnet_plain_deep": ("exploding", "branch_scaling"),
    "resnet_dead_conv": ("dead_channels", None),
    "lstm_forget_negative": ("vanishing", "forget_bias"),
    "lstmcell_forget_negative": ("vanishing", "forget_bias"),
    "gru_update_negative": ("vanishing", None),
    "vit_postln_high_lr": ("vanishing", "pre_layernorm"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_architectures_root_and_first_action(name: str) -> None:
    run, _ = A.setting(name)
    found = diagnose(run)
    kind, action = REAL[name]
    first = root(found)
    assert first.kind == kind, found.kinds
    if action is not None:
        assert first.remedies[0].key == action
    keys = {r.key for f in found for r in f.remedies}
    if run.meta["architecture"]["kind"] == "transformer":
        assert not {"relu", "batchnorm", "leaky_relu", "lstm_gru"} & keys
    if run.meta["architecture"]["kind"] == "rnn":
        assert "grad_clipping" not in [r.key for r in first.remedies[:1]]  # not for vanishing
    for f in found:
        for r in f.remedies:
            compile(r.code, f"<{r.key}>", "exec")


@pytest.mark.slow
@pytest.mark.parametrize("name", A.HEALTHY)
def test_real_architectures_healthy_get_no_warning(name: str) -> None:
    run, _ = A.setting(name)
    found = diagnose(run)
    assert [(f.kind, f.severity) for f in found if f.severity != "info"] == []
    assert FLOW.isdisjoint(found.kinds)


# ------------------------------------------------------------------ where the story is shown
def test_cli_and_notebook_lead_with_the_root_cause_and_one_action(tmp_path, capsys) -> None:
    from gradprobe import load
    from gradprobe.cli import main

    torch.manual_seed(0)
    model = S.TinyGPT(depth=2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    data = A.token_sequences(32 * 30, 17, seed=1)
    with Probe(model, opt, store=tmp_path / "gpt") as probe:
        for s in range(30):
            x = data[s * 32 : (s + 1) * 32]
            loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss)
    found = diagnose(load(tmp_path / "gpt"))
    first = found[0]
    assert first.cause is None and first.remedies
    assert main(["diagnose", str(tmp_path / "gpt")]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith(f"Root cause: {first.kind}")
    assert f"Do this first: {first.remedies[0].name}" in out
    for f in found[1:]:
        if f.cause == first.kind:
            assert f"- {f.kind} (" in out.split("Consequences")[1]
    html = found._repr_html_()
    assert html.index("Root cause") < html.index("<table")
    assert f"<b>{first.kind}</b>" in html and "<pre>" in html  # the first action's code
    assert html.count("<tr") == len(found) + 1


def test_clipping_a_trainer_was_configured_with_is_not_proposed_again() -> None:
    """A run whose trainer clips (the callbacks store its configuration in the meta) is not
    told to add clipping, even where clipping never had to cut a step."""
    from _diagnose_cases import case

    base = case("rnn_large")  # plain SGD RNN: clipping is its first remedy
    assert diagnose(base).of("exploding").remedies[0].key == "grad_clipping"
    for key in ("gradient_clip_val", "max_grad_norm"):
        run = Run({**base.meta, "trainer": {key: 1.0}}, base.frame())
        keys = {r.key for f in diagnose(run) for r in f.remedies}
        assert "grad_clipping" not in keys, key
