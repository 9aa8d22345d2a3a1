"""The sequence statistics of a model that changes (issue 25, follow): ``token_cosine``,
``logit_max``/``logit_z`` and ``error_time_*`` go on after an adapter is added, the head is
swapped, a block is appended or the recurrent module is replaced, at the sites of the model
as it is now; each against an independent computation (numpy cosines and float64
logsumexp of an un-probed twin's outputs, float64 autograd per time step), training
bit-identical to the twin doing the same changes, at every step and on a cadence.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe

CHANGE_AT = 2  # the step whose first forward sees the changed model
STEPS = 6


def _rows(frame, stat: str) -> dict[tuple[int, str], float]:
    rows = frame[frame.stat == stat]
    out = {(int(s), str(n)): float(v) for s, n, v in zip(rows.step, rows.name, rows.value)}
    assert len(out) == len(rows), "one row per step and module"
    return out


def _recorded(every: int | str) -> list[int]:
    # "auto" records the first 20 steps (then every 50th): all of these
    return list(range(0, STEPS, every)) if isinstance(every, int) else list(range(STEPS))


def _cosine(y: np.ndarray) -> float:
    """Mean cosine over ordered pairs of distinct positions, per sequence (float64; T ≤ 32,
    so the Probe samples every position)."""
    unit = y / np.linalg.norm(y, axis=-1, keepdims=True)
    gram = np.einsum("ntf,nsf->nts", unit, unit)
    off = ~np.eye(y.shape[1], dtype=bool)
    return float(gram[:, off].mean())


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value,index]


# ---------------------------------------------------------------- a transformer that changes
def _layer() -> nn.Module:
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.blocks = nn.ModuleList([_layer() for _ in range(2)])
        self.head = nn.Linear(16, 20)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _add_adapter(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    # Registered after the head and never called: the final projection stays "head".
    model.adapter = nn.Linear(16, 16)
    opt.add_param_group({"params": model.adapter.parameters()})


def _swap_head(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.head = nn.Linear(16, 20)
    opt.add_param_group({"params": model.head.parameters()})


def _append_block(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.blocks.append(_layer())
    opt.add_param_group({"params": model.blocks[-1].parameters()})


def _train_stack(
    change: Callable[[nn.Module, torch.optim.Optimizer], None], every: int | str | None
) -> tuple[nn.Module, list[dict[str, np.ndarray]], object]:
    """Train, changing the model before step CHANGE_AT; ``every=None``: the un-probed twin,
    whose blocks' and head's outputs are kept by forward hooks of its own (they only read)."""
    torch.manual_seed(0)
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 20, (3, 9), generator=gen) for _ in range(STEPS)]
    probe = Probe(model, opt, every=every) if every is not None else None
    outputs: list[dict[str, np.ndarray]] = []
    for step, tokens in enumerate(data):
        if step == CHANGE_AT:
            torch.manual_seed(7)  # the same new weights in both runs
            change(model, opt)
        handles = []
        if probe is None:
            seen: dict[str, np.ndarray] = {}
            outputs.append(seen)
            sites = [f"blocks.{i}" for i in range(len(model.blocks))] + ["head"]
            for name in sites:

                def keep(_m, _i, out, name=name, seen=seen) -> None:
                    seen[name] = _first(out).detach().double().numpy()

                handles.append(model.get_submodule(name).register_forward_hook(keep))
        logits = model(tokens)
        nn.functional.cross_entropy(logits.reshape(-1, 20), tokens.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        for h in handles:
            h.remove()
    frame = None
    if probe is not None:
        frame = probe.frame()
        probe.close()
    return model, outputs, frame


@pytest.mark.parametrize("every", [1, "auto", 3])
@pytest.mark.parametrize(
    "change", [_add_adapter, _swap_head, _append_block], ids=["adapter", "head", "block"]
)
def test_token_cosine_and_logits_go_on_after_the_model_changes(change, every) -> None:
    model, _, frame = _train_stack(change, every)
    twin, outputs, _ = _train_stack(change, None)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in twin.named_parameters()]
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # training bit-identical with and without the Probe
    recorded = _recorded(every)
    assert any(s >= CHANGE_AT for s in recorded)
    cosines, tops, zs = (_rows(frame, s) for s in ("token_cosine", "logit_max", "logit_z"))
    expected_cos = {
        (s, name): _cosine(y)
        for s in recorded
        for name, y in outputs[s].items()
        if name.startswith("blocks.")
    }
    # Every block of the model as it is at each recorded step, and nothing else.
    assert set(cosines) == set(expected_cos)
    for key, value in expected_cos.items():
        # float32 cosines of 16-wide vectors: each within ~16·6e-8; their mean too
        assert cosines[key] == pytest.approx(value, abs=1e-5), key
    assert set(tops) == set(zs) == {(s, "head") for s in recorded}
    for s in recorded:
        logits = outputs[s]["head"].reshape(-1, 20)
        assert tops[(s, "head")] == logits.max()  # the largest float32 logit, exact
        # float32 logsumexp per position: relative error ~1e-6 of z ≈ 3
        assert zs[(s, "head")] == pytest.approx(_logsumexp(logits).mean(), rel=1e-5)
    if change is _append_block:
        assert (recorded[-1], "blocks.2") in cosines
    # Blocks, old and new, are sequence-only sites: their rows are token_cosine only.
    blocks = frame[frame.name.str.startswith("blocks.") & ~frame.name.str.contains(r"\.\d+\.")]
    assert set(blocks.stat) == {"token_cosine"}


def test_hugging_face_gpt2_head_swapped() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 50, (2, 10), generator=gen) for _ in range(4)]

    def train(probed: bool):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        probe = Probe(model, opt, every=1) if probed else None
        outputs = []
        for step, tokens in enumerate(data):
            if step == CHANGE_AT:  # a new, untied head (GPT-2 ties lm_head to wte)
                torch.manual_seed(7)
                model.lm_head = nn.Linear(32, 50, bias=False)
                opt.add_param_group({"params": model.lm_head.parameters()})
            seen: dict[str, np.ndarray] = {}
            outputs.append(seen)
            handles = []
            for name in [] if probed else ["transformer.h.0", "transformer.h.1", "lm_head"]:

                def keep(_m, _i, out, name=name, seen=seen) -> None:
                    seen[name] = _first(out).detach().double().numpy()

                handles.append(model.get_submodule(name).register_forward_hook(keep))
            model(tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad()
            for h in handles:
                h.remove()
        frame = probe.frame() if probe is not None else None
        if probe is not None:
            probe.close()
        return model, outputs, frame

    model, _, frame = train(True)
    twin, outputs, _ = train(False)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    cosines, tops, zs = (_rows(frame, s) for s in ("token_cosine", "logit_max", "logit_z"))
    for step, seen in enumerate(outputs):
        for block in ("transformer.h.0", "transformer.h.1"):
            # float32 cosines of 32-wide vectors: each within ~32·6e-8
            expected = _cosine(seen[block])
            assert cosines[(step, block)] == pytest.approx(expected, abs=1e-5)
        logits = seen["lm_head"].reshape(-1, 50)
        assert tops[(step, "lm_head")] == logits.max()
        assert zs[(step, "lm_head")] == pytest.approx(_logsumexp(logits).mean(), rel=1e-5)
    assert {s for s, _ in cosines} == {s for s, _ in zs} == set(range(len(data)))


# ---------------------------------------------------------------- a recurrent module replaced
class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.rnn: nn.Module = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, T, 3]
        out, _ = self.rnn(self.inp(x))
        return self.head(out[:, -1])  # the loss on the last step


def _reference_time(model: Fused, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """‖dL/dx_rnn[:, t]‖² per time step by float64 autograd on a copy of the model's
    current weights (x_rnn: the recurrent module's input)."""
    ref = copy.deepcopy(model).double()
    site: list[torch.Tensor] = []
    handle = ref.rnn.register_forward_pre_hook(lambda _m, a: site.append(a[0]))
    loss = nn.functional.cross_entropy(ref(x.double()), y)
    handle.remove()
    (g,) = torch.autograd.grad(loss, site)
    return g.square().sum(dim=(0, 2)).numpy()


@pytest.mark.parametrize("every", [1, "auto", 3])
@pytest.mark.parametrize("new", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_error_through_time_goes_on_after_the_recurrent_module_is_replaced(new, every) -> None:
    gen = torch.Generator().manual_seed(2)
    data = [
        (torch.randn(5, 16, 3, generator=gen), torch.randint(0, 4, (5,), generator=gen))
        for _ in range(STEPS)
    ]

    def train(probed: bool):
        torch.manual_seed(1)
        model = Fused()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        probe = Probe(model, opt, every=every) if probed else None
        references = []
        for step, (x, y) in enumerate(data):
            if step == CHANGE_AT:
                torch.manual_seed(7)
                model.rnn = new(8, 12, batch_first=True)
                opt.add_param_group({"params": model.rnn.parameters()})
            if not probed:
                references.append(_reference_time(model, x, y))  # this step's weights
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        frame = probe.frame() if probe is not None else None
        if probe is not None:
            probe.close()
        return model, references, frame

    model, _, frame = train(True)
    twin, references, _ = train(False)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    first, last, slope = (
        _rows(frame, s) for s in ("error_time_first", "error_time_last", "error_time_slope")
    )
    recorded = _recorded(every)
    assert set(first) == set(last) == set(slope) == {(s, "rnn") for s in recorded}
    for s in recorded:
        norms = np.sqrt(references[s])
        q = len(norms) // 4
        fit = np.polyfit(np.arange(len(norms)), np.log10(norms), 1)[0]
        # float32 backward through 16 steps against float64: relative error ≲ 1e-5 per
        # norm; the slope (decades) then within 1e-5/ln 10 per point
        assert first[(s, "rnn")] == pytest.approx(norms[:q].mean(), rel=1e-4)
        assert last[(s, "rnn")] == pytest.approx(norms[-q:].mean(), rel=1e-4)
        assert slope[(s, "rnn")] == pytest.approx(fit, abs=1e-4)
