"""Which tensors a model multiplies: found by watching one forward pass, not by module class.

A record model may hold its matrices in `nn.Linear` modules, as bare
`nn.Parameter`s, or as banks (one parameter of shape (n, out, in) whose
slices `bank[i]` are applied with `F.linear`). `trace(model, ids)` runs one
forward pass under a `TorchFunctionMode` that follows every parameter
through the views and casts a forward takes of it (`bank[i]`, `.to(dtype)`,
`.T`) to the products that consume it: `F.linear(x, W)`, `x @ W`
(`torch.matmul`), and `F.embedding(ids, W)`. Each 2-D matrix found is a
`Matrix`: a whole 2-D parameter, or one slice of a bank. `watch` is the
same observer for code that needs the inputs of each product (GPTQ's
Hessians).

Orientation: a matrix is described as (out, in), the way `F.linear` takes
it; one that is stored (in, out) (used as `x @ W`, or as `F.linear(x, W.T)`)
is `transposed`.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

# Ops that hand back the same values as their input (a cast, a copy): what comes out is still that parameter.
_SAME_VALUES = {"to", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach", "type"}
_MATMULS = {"matmul", "__matmul__", "mm"}


@dataclass(frozen=True)
class Matrix:
    """One matrix a forward pass multiplies (or looks up)."""

    name: str  # the parameter's name, with ".i" for slice i of a bank
    param: str  # the parameter's name
    index: int | None  # slice of a bank (a parameter of 3 or more dims); None for a 2-D parameter
    transposed: bool  # stored (in, out)
    op: str  # linear | matmul | embedding: how the forward first used it

    @property
    def is_slice(self) -> bool:
        return self.index is not None


def matrix_view(param: Tensor, m: Matrix) -> Tensor:
    """The matrix as (out, in): a view of the parameter (its slice, transposed back when stored (in, out))."""
    w = param.reshape(-1, *param.shape[-2:])[m.index] if m.is_slice else param
    return w.T if m.transposed else w


def matrix_numel(param: Tensor) -> int:
    """Elements of one matrix of a parameter (a bank's slice, or the whole 2-D parameter)."""
    return param.shape[-1] * param.shape[-2] if param.ndim >= 2 else param.numel()


class _Watch(TorchFunctionMode):
    """Follows parameters through views and casts to the products that use them; calls `on_use(matrix, x)` for each
    F.linear or matmul of a watched parameter (x: its input) and `on_use(matrix, None)` for each embedding lookup."""

    def __init__(self, params: dict[int, tuple[str, Tensor]], on_use: Callable[[Matrix, Tensor | None], None]):
        super().__init__()
        self.params = params  # id -> (name, parameter)
        self.on_use = on_use
        self.copies: dict[int, tuple] = {}  # id of a cast or copy -> the geometry it came from
        self.keep: list[Tensor] = []  # the copies themselves, so that no id is reused while the trace runs

    def _geometry(self, t) -> tuple | None:
        """(parameter id, element offset, shape, strides) of a tensor that is (a view of) a watched parameter."""
        if not isinstance(t, Tensor):
            return None
        if id(t) in self.copies:
            return self.copies[id(t)]
        if id(t) in self.params:
            return id(t), 0, tuple(t.shape), tuple(t.stride())
        base = t._base
        if base is None:
            return None
        if id(base) in self.params:
            return id(base), t.storage_offset() - base.storage_offset(), tuple(t.shape), tuple(t.stride())
        if id(base) in self.copies:  # a view of a cast: strides as the parameter's (casts keep the layout)
            pid, offset, _, _ = self.copies[id(base)]
            return pid, offset + t.storage_offset() - base.storage_offset(), tuple(t.shape), tuple(t.stride())
        return None

    def _matrix(self, geometry: tuple, op: str, flip: bool) -> Matrix | None:
        """The matrix a geometry stands for, or None when it is not one whole matrix of its parameter."""
        pid, offset, shape, stride = geometry
        name, p = self.params[pid]
        if p.ndim < 2 or len(shape) != 2 or not p.is_contiguous():
            return None
        r, c = p.shape[-2:]
        if (shape, stride) == ((r, c), (c, 1)):
            transposed = False
        elif (shape, stride) == ((c, r), (1, c)):
            transposed = True
        else:
            return None
        if offset % (r * c):
            return None
        index = offset // (r * c) if p.ndim > 2 else None
        if index is None and offset:
            return None
        return Matrix(name if index is None else f"{name}.{index}", name, index, transposed != flip, op)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fname = getattr(func, "__name__", "")
        if fname in _SAME_VALUES and args and isinstance(out, Tensor) and out is not args[0]:
            g = self._geometry(args[0])
            if g is not None:
                self.copies[id(out)] = g
                self.keep.append(out)
        elif func is F.linear and len(args) >= 2:
            self._use(args[1], "linear", args[0], flip=False)
        elif fname in _MATMULS and len(args) >= 2:
            self._use(args[1], "matmul", args[0], flip=True)  # x @ W: W is (in, out)
        elif func is F.embedding and len(args) >= 2:
            self._use(args[1], "embedding", None, flip=False)
        return out

    def _use(self, w, op: str, x, flip: bool) -> None:
        g = self._geometry(w)
        if g is not None and (m := self._matrix(g, op, flip)) is not None:
            self.on_use(m, x)


@contextlib.contextmanager
def watch(model: nn.Module, on_use: Callable[[Matrix, Tensor | None], None],
          only: set[str] | None = None) -> Iterator[None]:
    """Within the block, `on_use(matrix, x)` is called for every product of one of the model's parameters (those
    named in `only`, if given)."""
    params = {id(p): (n, p) for n, p in model.named_parameters() if only is None or n in only}
    with _Watch(params, on_use):
        yield


def probe_ids(model: nn.Module, length: int = 16) -> Tensor:
    """A short input for a tracing forward pass (token 0 repeated), on the model's device."""
    device = next(model.parameters()).device
    return torch.zeros(1, length, dtype=torch.long, device=device)


@torch.no_grad()
def trace(model: nn.Module, ids: Tensor | None = None, only: set[str] | None = None) -> dict[str, tuple[Matrix, int]]:
    """Every matrix one forward pass of `model` on `ids` multiplies or looks up: name -> (matrix, uses per forward)."""
    found: dict[str, Matrix] = {}
    uses: Counter = Counter()

    def on_use(m: Matrix, _x) -> None:
        found.setdefault(m.name, m)
        uses[m.name] += 1

    with watch(model, on_use, only):
        model(probe_ids(model) if ids is None else ids)
    return {name: (m, uses[name]) for name, m in found.items()}


def module_held(model: nn.Module, linear_types: tuple[type, ...] = (nn.Linear,)) -> dict[int, str]:
    """Parameters held as the weight of a linear or embedding module: id -> "linear" | "embedding"."""
    held = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            if isinstance(m, linear_types):
                held[id(w)] = "linear"
            elif isinstance(m, nn.Embedding):
                held.setdefault(id(w), "embedding")
    return held


def bare_candidates(model: nn.Module, skip: tuple[str, ...] = (), linear_types: tuple[type, ...] = (nn.Linear,)
                    ) -> set[str]:
    """Names of floating parameters of two or more dimensions that no linear or embedding module holds and no `skip`
    substring names: the ones only a trace can tell to be matrices."""
    held = module_held(model, linear_types)
    return {n for n, p in model.named_parameters() if p.ndim >= 2 and p.is_floating_point() and id(p) not in held
            and not any(s in n for s in skip)}
