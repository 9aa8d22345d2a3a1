"""Issue 21.4: several optimizers, several models — a step's statistics are those of the
gradients the step applies (docs/recording.md, "One rule: what the step applies").

A GAN's generator loss back-propagates through the discriminator and accumulates into
its ``.grad``; the discriminator's ``zero_grad()`` discards that gradient before its own
step. So D's step must not count that pass (its calls, error signals, activations), and
G's step must count its own. Each loop is trained under one Probe per model (or, in
Lightning, the callback's one Probe over both) and, from the same state, without any;
the references are taken on the un-probed twin: ``.grad`` right before each step, and
autograd for the error signals. Training must be bit-identical, no hook left after close.

Float64 models: the Probe's norms and the references are the same sums in another order
(~n·2⁻⁵³ relative, n ≤ 10³), so 1e-9 holds on any CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.stats import MODEL_NAME
from step_twins import error_norm_sq, hook_count, states_equal
from step_twins import table as stat_table

RTOL = 1e-9
bce = nn.functional.binary_cross_entropy_with_logits


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-300)


def pair(kind: str) -> tuple[nn.Module, nn.Module, int]:
    """(the model stepped second, whose backward goes through the other; the other;
    the width of the first's input). A GAN (G, D) or an actor and its critic."""
    torch.manual_seed(7)
    if kind == "gan":
        g = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))
        d = nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        return g.double(), d.double(), 3
    actor = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 4))
    critic = nn.Sequential(nn.Linear(4, 16), nn.ELU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    return actor.double(), critic.double(), 4


def alternating(kind: str, probed: bool, zero: str, freeze: bool) -> dict:
    """D's step on real and generated samples, then G's step through D. ``zero``: where
    and how the loop clears gradients ("before": zero_grad() before the forward, "after":
    between the forward and backward, "in_place": zero_grad(set_to_none=False) before)."""
    g, d, width = pair(kind)
    g_opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    d_opt = torch.optim.SGD(d.parameters(), lr=5e-2, momentum=0.5)
    hooks = hook_count(g, g_opt) + hook_count(d, d_opt)
    probes = (Probe(g, g_opt, every=1), Probe(d, d_opt, every=1)) if probed else ()
    gen = torch.Generator().manual_seed(11)
    refs: list[dict] = []
    clear = (
        (lambda o: o.zero_grad(set_to_none=False))
        if zero == "in_place"
        else (lambda o: o.zero_grad())
    )
    for _ in range(4):
        ref: dict = {}
        z = torch.randn(8, width, generator=gen, dtype=torch.float64)
        real = torch.randn(8, 4, generator=gen, dtype=torch.float64) * 0.5 + 1
        if zero != "after":
            clear(d_opt)
        fake = g(z)
        d_real, d_fake = d(real), d(fake.detach())
        d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        if zero == "after":
            clear(d_opt)
        if not probed:
            ref["d_err_sq"] = error_norm_sq(d_real, d_loss) + error_norm_sq(d_fake, d_loss)
        d_loss.backward()
        if not probed:
            ref["d_grads"] = {n: float(p.grad.norm()) for n, p in d.named_parameters()}
        d_opt.step()

        clear(g_opt)
        if freeze:
            d.requires_grad_(False)
        g_out = d(fake)
        g_loss = bce(g_out, torch.ones_like(g_out))
        if not probed:
            ref["g_err_sq"] = error_norm_sq(fake, g_loss)
        g_loss.backward()
        if not probed:
            ref["g_grads"] = {n: float(p.grad.norm()) for n, p in g.named_parameters()}
        g_opt.step()
        if freeze:
            d.requires_grad_(True)
        refs.append(ref)
    for probe in probes:
        probe.close()
    return {
        "g": g,
        "d": d,
        "refs": refs,
        "frames": [p.frame() for p in probes],
        "unhooked": hook_count(g, g_opt) + hook_count(d, d_opt) == hooks,
    }


@pytest.mark.parametrize("freeze", [False, True], ids=["D_trainable", "D_frozen_for_G"])
@pytest.mark.parametrize("zero", ["before", "after", "in_place"])
@pytest.mark.parametrize("kind", ["gan", "actor_critic"])
def test_each_models_step_counts_only_the_passes_it_applies(kind, zero, freeze):
    run = alternating(kind, True, zero, freeze)
    twin = alternating(kind, False, zero, freeze)
    assert states_equal(run["g"], twin["g"]) and states_equal(run["d"], twin["d"])
    assert run["unhooked"]
    g_frame, d_frame = run["frames"]
    last_g = str(len(run["g"]) - 1)
    last_d = str(len(run["d"]) - 1)
    for step, ref in enumerate(twin["refs"]):
        # D: its own two passes; G's pass through D (its gradient discarded, or never
        # made while D was frozen) is not D's.
        assert stat_table(d_frame, "calls", last_d)[step] == 2.0, step
        assert stat_table(d_frame, "calls", "0")[step] == 2.0, step
        assert close(stat_table(d_frame, "error_norm", last_d)[step] ** 2, ref["d_err_sq"]), step
        for name, norm in ref["d_grads"].items():
            assert close(stat_table(d_frame, "grad_norm", name)[step], norm), (step, name)
        d_global = math.sqrt(sum(v * v for v in ref["d_grads"].values()))
        assert close(stat_table(d_frame, "global_grad_norm", MODEL_NAME)[step], d_global)
        # G: one pass, its signal through D.
        assert stat_table(g_frame, "calls", last_g)[step] == 1.0
        assert close(stat_table(g_frame, "error_norm", last_g)[step] ** 2, ref["g_err_sq"])
        for name, norm in ref["g_grads"].items():
            assert close(stat_table(g_frame, "grad_norm", name)[step], norm), (step, name)
    assert not (stat_table(d_frame, "grad_missing", "0.weight") or {}).get(1)


def test_a_discarded_pass_leaves_no_activation_or_dead_unit_statistics():
    """What a dropped pass recorded in the forward goes too: act_mean and dead_frac are
    those of D's own two passes, checked against the outputs themselves."""
    g, d, width = pair("gan")
    g_opt, d_opt = torch.optim.SGD(g.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1)
    probe = Probe(d, d_opt, every=1, stats="default")
    outs: list[torch.Tensor] = []
    d[1].register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    gen = torch.Generator().manual_seed(1)
    expected = []
    for _ in range(3):
        z = torch.randn(8, width, generator=gen, dtype=torch.float64)
        real = torch.randn(8, 4, generator=gen, dtype=torch.float64) + 3  # far from G's
        d_opt.zero_grad()
        outs.clear()
        fake = g(z)
        loss = bce(d(real), torch.ones(8, 1, dtype=torch.float64)) + bce(
            d(fake.detach()), torch.zeros(8, 1, dtype=torch.float64)
        )
        loss.backward()
        own = torch.cat(outs)
        expected.append((float(own.mean()), float((own == 0).all(0).double().mean())))
        d_opt.step()
        g_opt.zero_grad()
        bce(d(g(z)), torch.ones(8, 1, dtype=torch.float64)).backward()  # through D, discarded
        g_opt.step()
    probe.close()
    frame = probe.frame()
    for step, (mean, dead) in enumerate(expected):
        assert close(stat_table(frame, "act_mean", "1")[step], mean)
        assert stat_table(frame, "dead_frac", "1")[step] == pytest.approx(dead, abs=1e-12)


# --------------------------------------------------------------------------- Lightning
pl = pytest.importorskip("lightning.pytorch", reason="the [lightning] extra is not installed")


class ManualGAN(pl.LightningModule):
    """Manual optimisation, two optimizers: G's step (through D), then D's."""

    def __init__(self, toggle: bool, reference: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.G, self.D, _ = pair("gan")
        self.toggle, self.reference = toggle, reference
        self.refs: list[dict] = []

    def training_step(self, batch, batch_idx):
        (real,) = batch
        g_opt, d_opt = self.optimizers()
        ref: dict = {}
        z = torch.randn(
            real.shape[0],
            3,
            generator=torch.Generator().manual_seed(batch_idx),
            dtype=torch.float64,
        )
        if self.toggle:
            self.toggle_optimizer(g_opt)
        fake = self.G(z)
        g_out = self.D(fake)
        g_loss = bce(g_out, torch.ones_like(g_out))
        if self.reference:
            ref["g_err_sq"] = error_norm_sq(fake, g_loss)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        if self.toggle:
            self.untoggle_optimizer(g_opt)
            self.toggle_optimizer(d_opt)
        d_real, d_fake = self.D(real), self.D(fake.detach())
        d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        if self.reference:
            ref["d_err_sq"] = error_norm_sq(d_real, d_loss) + error_norm_sq(d_fake, d_loss)
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        if self.reference:
            ref["grads"] = {n: float(p.grad.norm()) for n, p in self.named_parameters()}
        d_opt.step()
        if self.toggle:
            self.untoggle_optimizer(d_opt)
        self.refs.append(ref)

    def configure_optimizers(self):
        return torch.optim.Adam(self.G.parameters(), lr=1e-2), torch.optim.SGD(
            self.D.parameters(), lr=0.05
        )


def manual_fit(toggle: bool, callbacks: list, reference: bool) -> ManualGAN:
    model = ManualGAN(toggle, reference)
    real = torch.randn(32, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(real), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    return model


@pytest.mark.parametrize("toggle", [False, True], ids=["plain", "toggle_optimizer"])
def test_lightning_manual_optimisation_with_two_optimizers(toggle):
    from gradprobe.integrations.lightning import GradProbeCallback

    callback = GradProbeCallback(every=1)
    model = manual_fit(toggle, [callback], reference=False)
    twin = manual_fit(toggle, [], reference=True)
    assert states_equal(model, twin)
    frame = callback.run().frame()
    assert len(twin.refs) == 4
    for step, ref in enumerate(twin.refs):
        # A step is a training batch: D's modules count D's two passes, G's its one.
        assert stat_table(frame, "calls", "D.2")[step] == 2.0, step
        assert stat_table(frame, "calls", "G.2")[step] == 1.0, step
        assert close(stat_table(frame, "error_norm", "D.2")[step] ** 2, ref["d_err_sq"]), step
        assert close(stat_table(frame, "error_norm", "G.2")[step] ** 2, ref["g_err_sq"]), step
        for name, norm in ref["grads"].items():
            assert close(stat_table(frame, "grad_norm", name)[step], norm), (step, name)
    assert hook_count(model) == 0


def test_one_model_two_optimizers_the_watched_step_updates_its_own_parameters():
    """A body and a head with optimizers of their own, the head's stepped after the
    Probe's: update_ratio is of the parameters the watched step updates (the head's
    would read 0 across it), gradients and calls of every module as the twin's."""

    def run(probed: bool) -> tuple[nn.Module, list[dict], object]:
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(5, 12), nn.GELU(), nn.Linear(12, 2)).double()
        body_opt = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
        head_opt = torch.optim.Adam(model[2].parameters(), lr=0.01)
        probe = Probe(model, body_opt, every=1) if probed else None
        gen = torch.Generator().manual_seed(9)
        refs = []
        for _ in range(3):
            x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
            body_opt.zero_grad()
            head_opt.zero_grad()
            model(x).pow(2).mean().backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            grads = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
            body_opt.step()
            after = {n: p.detach().clone() for n, p in model.named_parameters()}
            head_opt.step()
            ratio = {n: float((after[n] - b).norm() / b.norm()) for n, b in before.items()}
            refs.append({"grads": grads, "ratio": ratio})
        frame = probe.frame() if probe is not None else None
        if probe is not None:
            probe.close()
        return model, refs, frame

    model, _, frame = run(True)
    twin, refs, _ = run(False)
    assert states_equal(model, twin)
    for step, ref in enumerate(refs):
        for name in ("0.weight", "0.bias"):
            assert close(stat_table(frame, "update_ratio", name)[step], ref["ratio"][name])
        for name, norm in ref["grads"].items():
            assert close(stat_table(frame, "grad_norm", name)[step], norm)
        assert stat_table(frame, "calls", "2")[step] == 1.0
    assert not stat_table(frame, "update_ratio", "2.weight")
    assert hook_count(model) == 0
