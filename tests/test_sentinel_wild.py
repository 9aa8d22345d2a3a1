"""The sentinel's short route (recording/sentinel.py) in the wild: a compiled model, a
real Lightning Trainer, a GAN, activation checkpointing, bf16 weights, flushes and
frames mid-run; and two loops that made the rows wrong before (issue 26): gradients
clamped through ``.data`` (no version bump: found by comparing at the checked steps) and
a loss logged before backward by a loop that calls the model's parts (no hook sees that
forward at a sentinel step: the loss's autograd graph says which step it is of). The
harness and what it checks: tests/sentinel_twins.py.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradprobe.recording.clock import AUTO_EVERY, AUTO_FIRST
from gradprobe.recording.hookup import warn_compiled
from gradprobe.stats import MODEL_NAME
from sentinel_twins import (
    AT,
    SENTINEL_STEPS,
    STEPS,
    Attach,
    Paths,
    TwoPart,
    batch,
    check,
    log,
    mlp,
    taken_everywhere,
    train,
    verify,
    watch_paths,
)


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Paths:
    return watch_paths(monkeypatch)


# ---------------------------------------------------------------- gradients changed unseen
def _clamped_through_data(refs: list[dict[str, float]]) -> Callable[[Attach], nn.Module]:
    """The DQN tutorial's clipping, ``param.grad.data.clamp_(-c, c)``, as RL code keeps
    writing it: an in-place write through ``.data`` does not bump the tensor's version
    counter. ``refs``: the norms of ``.grad`` read right before each optimizer step, in
    float64 (the un-probed run's)."""

    def case(attach: Attach) -> nn.Module:
        model = mlp()
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
        probe = attach(model, opt)
        gen = torch.Generator().manual_seed(14)
        for _ in range(STEPS):
            x, y = batch(gen)
            opt.zero_grad()
            loss = nn.functional.smooth_l1_loss(model(x), 10 * y)
            loss.backward()
            for p in model.parameters():
                p.grad.data.clamp_(-0.02, 0.02)
            if probe is None:
                named = model.named_parameters()
                refs.append({n: float(p.grad.double().norm()) for n, p in named})
            opt.step()
            log(probe, loss=loss)
        return model

    return case


@pytest.mark.parametrize("every", ["auto", 1])
def test_gradients_changed_through_data_are_measured_as_the_step_applies_them(every):
    refs: list[dict[str, float]] = []
    case = _clamped_through_data(refs)
    plain = train(case, None)
    run = train(case, every)
    for name, value in plain["state"].items():
        assert torch.equal(run["state"][name], value), name
    frame = run["frame"]
    rows = frame[frame.stat == "grad_norm"]
    got = {(r.step, r.name): r.value for r in rows.itertuples()}
    assert len(refs) == STEPS and len(got) == STEPS * len(refs[0])
    # The Probe's norms are float32 sums of at most 256 squares (relative error below
    # 256·2⁻²⁴ ≈ 1.5e-5, halved by the square root) against float64 ones: 1e-4 holds on
    # any CPU, and is far below the factor (~10 here) by which a stale norm is off.
    wrong = {
        (step, name): (got[step, name], want)
        for step, norms in enumerate(refs)
        for name, want in norms.items()
        if not math.isclose(got[step, name], want, rel_tol=1e-4)
    }
    assert not wrong, wrong


# ---------------------------------------------------------------- torch.compile
def _compiled(hooked: bool) -> Callable[[Attach], nn.Module]:
    def case(attach: Attach) -> nn.Module:
        return _compile(attach, hooked)

    return case


def _compile(attach: Attach, hooked: bool) -> nn.Module:
    """The model compiled before the Probe is made (aot_eager: dynamo and AOTAutograd's
    graphs, without inductor's slow codegen). ``hooked``: every module probed (the hooks
    stay on at every step, each a graph break), else the parameters only (modules=[]:
    the graph stays whole)."""
    torch._dynamo.reset()
    model = mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = attach(compiled, opt, **({} if hooked else {"modules": []}))
    gen = torch.Generator().manual_seed(16)
    for _ in range(STEPS):
        x, y = batch(gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        log(probe, loss=loss)
    return model


@pytest.mark.parametrize("hooked", [False, True], ids=["params", "modules"])
def test_a_compiled_model_takes_the_short_route(paths, hooked):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_compiled()
    said = frozenset({str(caught[0].message)})
    sentinels = check(_compiled(hooked), paths, findings=said)
    taken_everywhere(paths, sentinels)


# ---------------------------------------------------------------- Lightning
def _fit(every: str | int | None) -> dict[str, Any]:
    """A real Lightning ``Trainer``: two micro-batches a step, clipping by norm (inside
    the closure Lightning gives ``optimizer.step``), the Probe by the callback."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradprobe.integrations.lightning import GradProbeCallback

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(17)
    x, y = batch(gen, 8 * 2 * STEPS)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = Regressor()
    options = {"print_diagnosis": False, "log_to_logger": False}
    callbacks = [GradProbeCallback(every=every, **options)] if every is not None else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    said = {(w.category.__name__, str(w.message)) for w in caught}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    frame = callbacks[0].run().frame() if callbacks else None
    # (Lightning says some of its warnings once a process: only the Probe's are compared.)
    said = {w for w in said if w[0] == "GradprobeWarning"}
    return {"frame": frame, "state": state, "warnings": said}


def test_a_lightning_trainer_takes_the_short_route(paths):
    auto = _fit("auto")
    after_auto = {k: Counter(v) for k, v in vars(paths).items()}
    full, plain = _fit(1), _fit(None)
    assert vars(paths) == after_auto
    sentinels = verify(auto, full, plain, paths)
    taken_everywhere(paths, sentinels, backwards=2)


# ---------------------------------------------------------------- a loss logged early
def _parts_logged_before_backward(attach: Attach) -> nn.Module:
    """The loop calls the model's parts (``model.head(model.body(x))``: a backbone and a
    head, as many fine-tuning loops do) and logs the loss before its backward."""
    model = TwoPart()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = attach(model, opt)
    gen = torch.Generator().manual_seed(18)
    for _ in range(STEPS):
        x, y = batch(gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model.head(model.body(x)), y)
        log(probe, loss=loss)
        loss.backward()
        opt.step()
    return model


def test_a_loss_logged_before_backward_in_a_loop_calling_the_parts(paths):
    sentinels = check(_parts_logged_before_backward, paths)
    taken_everywhere(paths, sentinels)


# ---------------------------------------------------------------- a GAN
def _gan(attach: Attach) -> nn.Module:
    """A GAN, one Probe over both nets watching the discriminator's optimizer: the
    generator's backward goes through the discriminator (its gradients then discarded
    by its zero_grad), and the generator's gradients stay from one step to the next."""
    torch.manual_seed(0)
    gan = nn.ModuleDict(
        {
            "G": nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8)),
            "D": nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)),
        }
    )
    opt_g = torch.optim.Adam(gan["G"].parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(gan["D"].parameters(), lr=2e-4, betas=(0.5, 0.999))
    probe = attach(gan, opt_d)
    bce = nn.functional.binary_cross_entropy_with_logits
    gen = torch.Generator().manual_seed(19)
    for _ in range(STEPS):
        real = torch.randn(16, 8, generator=gen) + 2
        z = torch.randn(16, 4, generator=gen)
        fake = gan["G"](z)
        opt_d.zero_grad()
        d_real, d_fake = gan["D"](real), gan["D"](fake.detach())
        loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        loss_d.backward()
        opt_d.step()
        log(probe, loss=loss_d)
        opt_g.zero_grad()
        d_fake = gan["D"](fake)
        loss_g = bce(d_fake, torch.ones_like(d_fake))
        loss_g.backward()
        opt_g.step()
    return gan


def test_a_gan_with_the_probe_on_the_discriminators_optimizer(paths):
    sentinels = check(_gan, paths)
    # From the first step on, every parameter has a gradient at the discriminator's step:
    # its own, and the generator's left by the step before. Two backward passes a step
    # (the generator's, after the discriminator's step, is of the next step: the last one
    # is of a step that never closes).
    assert sentinels == SENTINEL_STEPS
    assert paths.short_steps() == sentinels and not paths.general
    assert paths.short_backward == {**dict.fromkeys(sentinels, 2), STEPS: 1}


# ---------------------------------------------------------------- bf16 weights, checkpointing
class Blocks(nn.Module):
    """Blocks, each under activation checkpointing (recomputed in backward), as HF's
    ``gradient_checkpointing_enable()`` does; ``dtype``: the weights' (pure bf16, as
    LLM fine-tuning keeps them)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 1)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head(x)


def _checkpointed(dtype: torch.dtype, whole: bool) -> Callable[[Attach], nn.Module]:
    """``whole``: the model itself checkpointed too (its forward runs again in backward)."""

    def case(attach: Attach) -> nn.Module:
        model = Blocks(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        probe = attach(model, opt)
        gen = torch.Generator().manual_seed(20)
        for _ in range(STEPS):
            x, y = batch(gen)
            x = x.to(dtype)
            opt.zero_grad()
            out = checkpoint(model, x, use_reentrant=False) if whole else model(x)
            loss = nn.functional.mse_loss(out.float(), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            log(probe, loss=loss)
        return model

    return case


@pytest.mark.parametrize(
    ("dtype", "whole"),
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)],
    ids=["blocks", "whole", "bf16-weights"],
)
def test_checkpointed_blocks_and_bf16_weights_take_the_short_route(paths, dtype, whole):
    sentinels = check(_checkpointed(dtype, whole), paths)
    taken_everywhere(paths, sentinels)


# ---------------------------------------------------------------- flushes, frames mid-run
def _flushing(flush_every: int, stats: str) -> Callable[[Attach], nn.Module]:
    """Rows flushed every ``flush_every`` steps and read mid-run (a notebook's
    ``probe.frame()``), clipping every third step only (the route reuses backward's norms
    at the others)."""

    def case(attach: Attach) -> nn.Module:
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        probe = attach(model, opt, flush_every=flush_every, stats=stats)
        gen = torch.Generator().manual_seed(21)
        for step in range(STEPS):
            x, y = batch(gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step % 3 == 0:
                nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            log(probe, loss=loss)
            if probe is not None and step % 11 == 0:
                probe.frame()
        return model

    return case


@pytest.mark.parametrize(("flush_every", "stats"), [(1, "default"), (7, "full")])
def test_flushes_and_frames_mid_run(paths, flush_every, stats):
    sentinels = check(_flushing(flush_every, stats), paths)
    taken_everywhere(paths, sentinels)


# ---------------------------------------------------------------- found in review
def _cast_in_place(attach: Attach) -> nn.Module:
    """The model cast to bfloat16 in place at a sentinel step (``model.to(dtype)`` keeps
    the Parameter objects: no model change is seen); the optimizer keeps stepping them."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = attach(model, opt)
    gen = torch.Generator().manual_seed(21)
    for step in range(STEPS):
        if step == AT:
            model.to(torch.bfloat16)
        x, y = batch(gen)
        dtype = next(model.parameters()).dtype
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        log(probe, loss=loss)
    return model


def test_a_model_cast_in_place_is_laid_out_again(paths):
    sentinels = check(_cast_in_place, paths)
    assert sentinels == SENTINEL_STEPS
    # The cast is found at its step's backward (the gradients' dtype): the route is laid
    # out again for bfloat16 there, and short throughout.
    taken_everywhere(paths, sentinels)


def _frozen_with_a_stale_grad(attach: Attach) -> nn.Module:
    """A layer frozen before the Probe is made whose ``.grad`` stays (``zero_grad(
    set_to_none=False)`` zeroes it in place each step): the general path measures it
    (every parameter with a ``.grad``), and so does the route."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(22)
    x, y = batch(gen)
    nn.functional.mse_loss(model(x), y).backward()  # a first step: every .grad made
    opt.step()
    model[0].requires_grad_(False)
    probe = attach(model, opt)
    for _ in range(STEPS):
        x, y = batch(gen)
        opt.zero_grad(set_to_none=False)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        log(probe, loss=loss)
    return model


def test_a_frozen_layer_with_a_stale_grad_keeps_the_route(paths):
    sentinels = check(_frozen_with_a_stale_grad, paths)
    assert sentinels == SENTINEL_STEPS
    taken_everywhere(paths, sentinels)


def _float64_explosion(attach: Attach) -> nn.Module:
    """A float64 model whose gradients' squares overflow float64 (norms ~1e160: an
    explosion): the spike total is inf, as torch's sum would give, and no step loses its
    rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: only the rows
    probe = attach(model, opt)
    gen = torch.Generator().manual_seed(23)
    for step in range(STEPS):
        x, y = batch(gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x.double()), y.double())
        (loss * (1e160 if step == AT else 1.0)).backward()
        opt.step()
        log(probe, loss=loss)
    return model


def test_squares_past_float64_keep_the_rows(paths):
    # The global norm is inf, which the live check says (an inf total is no spike for
    # the burst's rule, gradprobe/spikes.py, on either path; the per-parameter norms are
    # finite: no NaN burst either).
    recorded = set(range(AUTO_FIRST)) | {AUTO_EVERY}
    said = f"gradprobe: step {AT}: NaN/Inf in `{MODEL_NAME}` (global_grad_norm)"
    auto = train(_float64_explosion, "auto")
    full = train(_float64_explosion, 1)
    plain = train(_float64_explosion, None)
    for run in (auto, full):  # numpy's, folding the squares at the flush: both alike
        overflow = {w for w in run["warnings"] if w[0] == "RuntimeWarning"}
        assert {m for _, m in overflow} <= {"overflow encountered in square"}
        run["warnings"] -= overflow
    sentinels = verify(auto, full, plain, paths, recorded, frozenset({said}))
    taken_everywhere(paths, sentinels)


def _unfrozen_between_micro_batches(attach: Attach) -> nn.Module:
    """Two micro-batches a step; at a sentinel step the frozen first layer is unfrozen
    between them (its optimizer already holds it): the first backward is measured on the
    route's first layout, the second lays it out again with the new gradient."""
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = attach(model, opt)
    gen = torch.Generator().manual_seed(24)
    for step in range(STEPS):
        opt.zero_grad()
        for half in range(2):
            if step == AT and half == 1:
                model[0].requires_grad_(True)
            x, y = batch(gen)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            log(probe, loss=loss)
        opt.step()
    return model


def test_a_layer_unfrozen_between_micro_batches(paths):
    sentinels = check(_unfrozen_between_micro_batches, paths)
    taken_everywhere(paths, sentinels, backwards=2)
