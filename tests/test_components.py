"""The recording engine's shape: components that own their state, one context, named events.

Read from the source with ``ast`` (nothing of the checked code runs), except the last
test, which checks the events' weak subscription on a live context: a component never
reads another's private attributes (only ``self``'s), the Probe facade holds nothing but
the context, the engine and its finalizer, and every event is declared, emitted by some
component and handled by some other.
"""

from __future__ import annotations

import ast
import gc
from pathlib import Path

from gradprobe.recording.context import EVENTS, Context

SRC = Path(__file__).resolve().parents[1] / "src" / "gradprobe"
COMPONENTS = sorted((SRC / "recording").glob("*.py"))

# Private names of other objects the components may read, each with why: PyTorch's own
# (tensors' version counters, autograd nodes, the scaler's scale, the C bindings).
ALLOWED = {
    "_version": "a tensor's in-place version counter (host number, no sync)",
    "_sequence_nr": "an autograd node's identity",
    "_scale": "the GradScaler's scale tensor",
    "_C": "torch._C",
    "_functorch": "torch._C._functorch (the transform stack)",
    "_autograd": "torch._C._autograd (autograd's sequence number: which step a logged loss is of)",
    "_current_graph_task_id": "torch._C: is a backward running",
    "_foreach_norm": "torch._foreach_*",
    "_foreach_mul": "torch._foreach_*",
    "_foreach_sub_": "torch._foreach_*",
    "_foreach_copy_": "torch._foreach_*",
    "_pytree": "torch.utils._pytree",
    "_execution_engine": "autograd's engine",
    "_modules": "nn.Module's own table of children (the model's signature, walked by hand)",
    "_parameters": "nn.Module's own table of parameters (the model's signature)",
}


def _foreign_privates(path: Path) -> list[str]:
    """``x._name`` where ``x`` is not ``self`` (nor a module of torch's)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") or node.attr in ALLOWED:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_no_component_reads_another_components_private_state() -> None:
    found = [hit for path in COMPONENTS for hit in _foreign_privates(path)]
    assert found == []


def test_the_probe_is_a_facade_over_the_context_and_the_engine() -> None:
    tree = ast.parse((SRC / "probe.py").read_text(encoding="utf-8"))
    (probe,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Probe")
    assert probe.bases == []  # no mixin
    private = {
        node.attr
        for node in ast.walk(probe)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    }
    methods = {n.name for n in probe.body if isinstance(n, ast.FunctionDef)}
    assert private - methods == {"_ctx", "_engine", "_finalizer"}


def _calls(method: str) -> dict[str, list[str]]:
    """Event names passed to ``ctx.<method>`` (or ``partial(ctx.<method>, ...)``), by file."""
    out: dict[str, list[str]] = {}
    for path in COMPONENTS:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func, args = node.func, node.args
            if isinstance(func, ast.Name) and func.id == "partial" and args:
                func, args = args[0], args[1:]
            named = args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)
            if isinstance(func, ast.Attribute) and func.attr == method and named:
                out.setdefault(args[0].value, []).append(path.stem)
    return out


def test_every_event_is_declared_emitted_and_handled() -> None:
    emitted, handled = _calls("emit"), _calls("on")
    assert set(emitted) <= set(EVENTS) and set(handled) <= set(EVENTS)
    assert set(emitted) == set(EVENTS), set(EVENTS) - set(emitted)
    assert set(handled) == set(EVENTS), set(EVENTS) - set(handled)


def test_events_reach_live_subscribers_in_order_and_forget_dropped_ones() -> None:
    ctx = Context()
    heard: list[tuple[str, int]] = []

    class Component:
        def __init__(self, name: str) -> None:
            self.name = name
            ctx.on("step_closed", self.closed)

        def closed(self, step: int) -> None:
            heard.append((self.name, step))

    first, second = Component("first"), Component("second")
    ctx.emit("step_closed", 3)
    assert heard == [("first", 3), ("second", 3)]
    del first
    gc.collect()
    ctx.emit("step_closed", 4)  # held weakly: a component dropped is not called
    assert heard[2:] == [("second", 4)]
    assert second.name == "second"
