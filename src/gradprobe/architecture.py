"""What a model is and does, read once when a Probe attaches: the run's meta ``architecture``.

The diagnosis chooses its advice by architecture (warmup for a Transformer, BatchNorm2d
for a CNN, a forget-gate bias for an LSTM), so the architecture must be read from what
the modules *are* and what their ``forward`` *does*, never from class names: a
Transformer whose attention class is called ``Attn`` is a Transformer.

:func:`describe_architecture` returns a small dict of plain JSON types (stored in the
run's meta, so a loaded run is diagnosed as a live one):

``kind``
    ``"rnn"``, ``"transformer"``, ``"cnn"`` or ``"mlp"`` (first that applies, in that order).
``attention``
    modules that compute attention: an ``nn.MultiheadAttention``, a ``forward`` that calls
    ``scaled_dot_product_attention``, or one that multiplies matrices (``@``, ``matmul``,
    ``bmm``, ``einsum``) and takes a ``softmax``.
``embeddings``, ``convolutions``, ``recurrent``
    modules by what they are (``nn.Embedding``/``EmbeddingBag``; ``nn.ConvNd``, not
    transformers' ``Conv1D``, a linear layer; ``nn.RNNBase`` and the cells).
``norms``
    ``{name: family}`` with family ``batch``, ``layer``, ``rms``, ``group``, ``instance``,
    ``local`` (``LocalResponseNorm``): torch's classes by type (:mod:`gradprobe.kinds`),
    other libraries' by what they hold (a ``weight`` and an
    ``eps``/``variance_epsilon`` and a ``forward`` computing a mean/variance).
``residual``
    modules whose ``forward`` adds its input (or an alias of it: ``identity = x``) to what
    its children computed: ``x + self.f(x)``, ``out += identity``.
``norm_placement``
    ``"pre_ln"`` / ``"post_ln"`` where it can be read: a configured Transformer layer's
    ``norm_first``, or a residual addition that normalises the branch's input (pre) or
    the sum (post). ``None`` when no module says; the diagnosis then reads forward order.
``configured``
    what modules are configured to do where it is not a module: a Transformer layer's
    ``activation`` (a function) and ``norm_first``.
``activations``
    activation functions called in ``forward`` code (``F.gelu``, ``torch.relu``,
    ``x.sigmoid()``) or configured, besides activation modules (those are in ``modules``).
``parametrizations``
    modules that compute a weight (``torch.nn.utils.parametrize``): their output is a
    parameter, not a signal, so they are no layer of the depth profile.
``branches``
    modules on a parallel branch whose output is added to another module's output in the
    same ``forward`` (``base(x) + lora_B(lora_A(x))``: the side with fewer parameters), not
    on the path the error signal takes through the depth of the model.

Whatever cannot be read (a ``forward`` without source) is left out.
"""

from __future__ import annotations

import ast
import dis
import inspect
import textwrap
import types
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .kinds import module_kind

__all__ = ["ATTENTION_CALLS", "describe_architecture"]

# Names in a forward's code that mean attention is computed there.
ATTENTION_CALLS = ("scaled_dot_product_attention", "flash_attn_func", "memory_efficient_attention")
_MATMUL_NAMES = {"matmul", "bmm", "einsum", "baddbmm"}
_ACTIVATION_CALLS = {
    "relu": "relu",
    "relu_": "relu",
    "gelu": "gelu",
    "silu": "silu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "leaky_relu": "leaky_relu",
    "elu": "elu",
    "selu": "selu",
    "softplus": "softplus",
    "mish": "mish",
}


def _forward(module: nn.Module) -> Any:
    """The class's own forward function, under any decorators (``functools.wraps``)."""
    fn = getattr(type(module), "forward", None)
    try:
        return inspect.unwrap(fn) if fn is not None else None
    except ValueError:  # a cycle of __wrapped__
        return fn


def _forward_code(module: nn.Module) -> types.CodeType | None:
    return getattr(_forward(module), "__code__", None)


def _all_code(code: types.CodeType) -> list[types.CodeType]:
    """A code object and those nested in it (comprehensions, inner functions)."""
    out = [code]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out += _all_code(const)
    return out


def _code_facts(
    code: types.CodeType, namespace: dict[str, Any] | None = None
) -> tuple[set[str], bool]:
    """The names a forward refers to (functions, attributes), and whether it uses ``@``.

    With the forward's globals (``namespace``), the plain Python functions it calls by
    global name are read too, one level deep: attention is often computed in a helper
    (transformers' ``eager_attention_forward``).
    """
    names: set[str] = set()
    matmul = False
    codes = _all_code(code)
    if namespace is not None:
        for name in code.co_names:
            helper = namespace.get(name)
            if isinstance(helper, types.FunctionType) and helper.__code__ is not code:
                codes += _all_code(helper.__code__)
    for c in codes:
        names |= set(c.co_names)
        for ins in dis.get_instructions(c):
            if ins.opname in ("BINARY_MATRIX_MULTIPLY", "INPLACE_MATRIX_MULTIPLY") or (
                ins.opname == "BINARY_OP" and ins.argrepr in ("@", "@=")
            ):
                matmul = True
    return names, matmul


def _norm_family(module: nn.Module) -> str | None:
    family = module_kind(module).norm
    if family is not None:
        return family
    # Other libraries' norms (LlamaRMSNorm, T5LayerNorm): a scale vector, an epsilon, and a
    # forward that takes a mean or variance and a reciprocal square root.
    weight = getattr(module, "weight", None)
    if weight is None or getattr(weight, "ndim", 0) != 1:
        return None
    if not any(hasattr(module, e) for e in ("eps", "variance_epsilon", "epsilon")):
        return None
    code = _forward_code(module)
    if code is None:
        return None
    names, _ = _code_facts(code)
    if {"rsqrt", "sqrt"} & names and {"mean", "var", "pow", "norm"} & names:
        return "layer" if "var" in names or "layer_norm" in names else "rms"
    if "layer_norm" in names:
        return "layer"
    return None


def _source_tree(module: nn.Module, memo: dict[Any, Any]) -> ast.FunctionDef | None:
    """The forward's syntax tree; ``memo`` keeps it for the other instances of the class
    within one description (a model repeats a few classes many times: GPT-2's blocks)."""
    fn = _forward(module)
    key = ("tree", fn)
    if key not in memo:
        memo[key] = _parsed(fn)
    return memo[key]  # type: ignore[no-any-return]


def _parsed(fn: Any) -> ast.FunctionDef | None:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None  # type: ignore[return-value]


def _forward_facts(fn: Any, memo: dict[Any, Any]) -> tuple[set[str], bool]:
    key = ("facts", fn)
    if key not in memo:
        memo[key] = _code_facts(fn.__code__, getattr(fn, "__globals__", None))
    return memo[key]  # type: ignore[no-any-return]


def _self_calls(node: ast.AST, children: set[str]) -> list[str]:
    """Children called in an expression: ``self.f(...)``, ``self.blocks[i](...)``."""
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            while isinstance(f, ast.Subscript):
                f = f.value
            if (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name)
                and f.value.id == "self"
                and f.attr in children
            ):
                out.append(f.attr)
    return out


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements in source order, those nested in loops and branches included."""
    out: list[ast.stmt] = []
    for stmt in body:
        out.append(stmt)
        for attr in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, attr, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                out += _statements(inner)
    return out


def _expressions(stmt: ast.stmt) -> list[ast.AST]:
    """The expression nodes of one statement, not those of statements nested in it."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = [stmt]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.stmt):
                out.append(child)
                todo.append(child)
    return out


def _residual_facts(
    module: nn.Module, norms: set[str], memo: dict[Any, Any]
) -> tuple[bool, str | None]:
    """Whether ``forward`` adds its input to what children computed, and where a norm sits.

    Dataflow by names, statement by statement in source order: the arguments and plain
    aliases of them (``identity = x``) are "input"; a name assigned from an expression
    that calls a child (or uses a computed name) is "computed", and remembers whether a
    norm was applied on its way. A ``+``/``+=`` of an input and a computed value is a
    residual addition; a normalised computed side is pre-LN (``x + f(LN(x))``), a norm
    applied to the sum is post-LN (``LN(x + f(x))``).
    """
    fn = _source_tree(module, memo)
    if fn is None or len(fn.args.args) < 2:
        return False, None
    children = {n for n, _ in module.named_children()}
    if not children:
        return False, None
    inputs = {a.arg for a in fn.args.args[1:]}
    computed: dict[str, bool] = {}  # name -> a norm was applied on its way
    residual = False
    placement: str | None = None

    def side(expr: ast.AST) -> tuple[str | None, bool]:
        if isinstance(expr, ast.Name) and expr.id in inputs:
            return "input", False
        calls = _self_calls(expr, children)
        used = [n.id for n in ast.walk(expr) if isinstance(n, ast.Name) and n.id in computed]
        if calls or used:
            return "computed", any(c in norms for c in calls) or any(computed[n] for n in used)
        return None, False

    def residual_sum(a: ast.AST, b: ast.AST) -> tuple[bool, bool]:
        (sa, na), (sb, nb) = side(a), side(b)
        if {sa, sb} == {"input", "computed"}:
            return True, na if sa == "computed" else nb
        return False, False

    for stmt in _statements(fn.body):
        for node in _expressions(stmt):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
                hit, pre = residual_sum(node.left, node.right)
                residual |= hit
                if hit and pre:
                    placement = "pre_ln"
            # post-LN: a norm applied to the sum, self.norm(x + self.f(x))
            if isinstance(node, ast.Call) and set(_self_calls(node, children)) & norms:
                for arg in node.args:
                    if (
                        isinstance(arg, ast.BinOp)
                        and isinstance(arg.op, ast.Add)
                        and residual_sum(arg.left, arg.right)[0]
                    ):
                        placement = placement or "post_ln"
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
            hit, pre = residual_sum(stmt.target, stmt.value)
            residual |= hit
            if hit and pre:
                placement = "pre_ln"
        targets: list[ast.AST] = []
        if isinstance(stmt, ast.Assign):
            targets = list(stmt.targets)
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and stmt.value is not None:
            targets = [stmt.target]
        if not targets:
            continue
        value = stmt.value
        kind, normed = side(value) if value is not None else (None, False)
        if isinstance(stmt, ast.AugAssign):
            kind, normed = side(ast.BinOp(stmt.target, ast.Add(), value))
        names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        for name in names:
            if kind == "input" and isinstance(value, ast.Name):
                inputs.add(name)
                computed.pop(name, None)
            elif kind == "computed":
                computed[name] = normed
                inputs.discard(name)
            else:
                inputs.discard(name)
                computed.pop(name, None)
    return residual, placement


def _parallel_branches(module: nn.Module, memo: dict[Any, Any]) -> list[str]:
    """Children on a parallel branch: the smaller side of a sum of two values computed by
    disjoint children (``base(x) + B(A(x))``: a LoRA adapter, an added router or side
    path). A residual sum is not one: ``x + f(LN(x))`` computes its second side from the
    first. Children called through an alias count (``lora_A = self.lora_A[name]``).
    """
    fn = _source_tree(module, memo)
    if fn is None:
        return []
    children = dict(module.named_children())
    if len(children) < 2:
        return []
    alias: dict[str, str] = {}  # local name -> child it refers to
    kids: dict[str, set[str]] = {}  # local name -> children whose calls computed it

    def child_of(f: ast.AST) -> str | None:
        while isinstance(f, ast.Subscript):
            f = f.value
        if (
            isinstance(f, ast.Attribute)
            and isinstance(f.value, ast.Name)
            and f.value.id == "self"
            and f.attr in children
        ):
            return f.attr
        if isinstance(f, ast.Name):
            return alias.get(f.id)
        return None

    def computed_by(expr: ast.AST) -> set[str]:
        out: set[str] = set()
        for sub in ast.walk(expr):
            if isinstance(sub, ast.Call) and (c := child_of(sub.func)):
                out.add(c)
            elif isinstance(sub, ast.Name) and sub.id in kids:
                out |= kids[sub.id]
        return out

    smaller: set[str] = set()

    def check(a: ast.AST, b: ast.AST) -> None:
        ka, kb = computed_by(a), computed_by(b)
        # Token + position embeddings are both the model's input, not a branch.
        embeds = any(module_kind(children[c]).embedding for c in ka | kb)
        if ka and kb and not ka & kb and not embeds:
            size = {
                side: sum(p.numel() for c in cs for p in children[c].parameters())
                for side, cs in (("a", ka), ("b", kb))
            }
            smaller.update(ka if size["a"] < size["b"] else kb)

    for stmt in _statements(fn.body):
        for node in _expressions(stmt):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
                check(node.left, node.right)
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
            check(stmt.target, stmt.value)
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and stmt.value is not None:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            ref = child_of(stmt.value) if not isinstance(stmt.value, ast.Call) else None
            made = computed_by(stmt.value)
            for name in names:
                if ref is not None:
                    alias[name] = ref
                elif isinstance(stmt, ast.AugAssign):
                    kids[name] = kids.get(name, set()) | made
                else:
                    kids[name] = made
    return sorted(smaller)


def _function_name(fn: Any) -> str | None:
    if isinstance(fn, nn.Module):
        return type(fn).__name__.lower()
    name = getattr(fn, "__name__", None)
    return str(name).lower() if name else None


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """The ``architecture`` dict of a run's meta (see the module doc).

    A forward whose source or code cannot be read is left out; the Probe turns any other
    failure into a warning and an empty dict (``Probe._describe``)."""
    out: dict[str, Any] = {
        "kind": "mlp",
        "attention": [],
        "embeddings": [],
        "convolutions": [],
        "recurrent": [],
        "norms": {},
        "residual": [],
        "norm_placement": None,
        "configured": {},
        "activations": [],
        "parametrizations": [],
        "branches": [],
    }
    _describe(model, out)
    return out


def _describe(model: nn.Module, out: dict[str, Any]) -> None:
    memo: dict[Any, Any] = {}  # per forward function, for this description only
    modules = list(model.named_modules())
    activations: set[str] = set()
    placements: set[str] = set()
    for name, m in modules:
        kind = module_kind(m)
        if kind.embedding:
            out["embeddings"].append(name)
        if kind.conv:
            out["convolutions"].append(name)
        if kind.recurrent:
            out["recurrent"].append(name)
        family = _norm_family(m)
        if family:
            out["norms"][name] = family
        if parametrize.is_parametrized(m):
            prefix = f"{name}.parametrizations" if name else "parametrizations"
            out["parametrizations"] += [
                f"{prefix}.{sub}" for sub, _ in m.parametrizations.named_modules() if sub
            ]
        if kind.transformer_layer:
            act = _function_name(getattr(m, "activation", None))
            norm_first = bool(getattr(m, "norm_first", False))
            out["configured"][name] = {"activation": act, "norm_first": norm_first}
            if act:
                activations.add(act)
            placements.add("pre_ln" if norm_first else "post_ln")
        if kind.attention:
            out["attention"].append(name)
            continue
        code = _forward_code(m)
        if code is None or type(m).__module__.startswith("torch.nn"):
            continue
        names, matmul = _forward_facts(_forward(m), memo)
        if any(a in names for a in ATTENTION_CALLS) or (
            "softmax" in names and (matmul or _MATMUL_NAMES & names)
        ):
            out["attention"].append(name)
        if any(True for _ in m.children()):
            # A container's forward applying a function between its children; a leaf's
            # forward is its own function (a tanh inside a GELU approximation is no tanh).
            activations |= {_ACTIVATION_CALLS[n] for n in names if n in _ACTIVATION_CALLS}
    for name, m in modules:
        if type(m).__module__.startswith("torch.nn") or not list(m.children()):
            continue
        # Where a norm sits matters for Transformers' LayerNorm/RMSNorm (pre-/post-LN);
        # a conv block's BatchNorm is in the branch either way.
        local_norms = {
            c
            for c, _ in m.named_children()
            if out["norms"].get(f"{name}.{c}" if name else c) in ("layer", "rms")
        }
        prefix = f"{name}." if name else ""
        out["branches"] += [prefix + c for c in _parallel_branches(m, memo)]
        residual, placement = _residual_facts(m, local_norms, memo)
        if residual:
            out["residual"].append(name)
            if placement and local_norms:
                placements.add(placement)
    # A configured torch layer that adds its input (TransformerEncoderLayer) is residual.
    out["residual"] += [n for n in out["configured"] if n not in out["residual"]]
    if placements:
        out["norm_placement"] = "post_ln" if "post_ln" in placements else "pre_ln"
    out["activations"] = sorted(activations)
    if out["recurrent"]:
        out["kind"] = "rnn"
    elif out["attention"]:
        out["kind"] = "transformer"
    elif out["convolutions"]:
        out["kind"] = "cnn"
