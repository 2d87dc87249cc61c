"""Where a run's model, data, tokenizer and artifacts come from, checked against each other.

Either the embedded demo (nothing given) or a checkpoint with its shard
directory and SentencePiece tokenizer. The checkpoint loads into the
baseline GPT, or into any model a `--model-fn` builds:

- `module:function` (a module importable here, the current directory
  included) or `path/to/file.py:function`; `resolve` turns either into a
  spec every worker can load (a module the environment has, or the file's
  absolute path);
- the function gets the checkpoint path and, when it takes them, the
  `device` and `dtype` the model will run in; nothing here casts the model;
- `--model-output` says what the model's forward returns: `logits`
  (ids -> (B, T, V)), `method:NAME` (call `model.NAME(ids)` instead, e.g. a
  record's `forward_logits` when `forward(ids, targets)` returns a loss),
  or `tuple:K` (element K of what forward returns).

`--artifact NAME=PATH` adds the user's own quantized file as regime NAME:
decoded by `--artifact-fn` (path -> state dict, or an nn.Module) or by the
built-in formats (`checkpoint.read_weights`), and loaded strictly into the
same model as the checkpoint. `resolve` checks all of it once, in the
driver; workers only read.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from e2ettt import data
from e2ettt.checkpoint import CheckpointError, Weights, check_compatible, load_model, read_weights
from e2ettt.demo import DemoConfig, build_demo, default_cache_dir
from e2ettt.tokenizer import ByteTables, build_byte_tables, load_tokenizer

OUTPUT_RULES = "logits, method:NAME (model.NAME(ids) gives the logits), tuple:K (element K of forward's output)"
_OUTPUT = re.compile(r"^(logits|method:[A-Za-z_]\w*|tuple:\d+)$")
_ARTIFACT_NAME = re.compile(r"^[A-Za-z][\w.]*$")


@dataclass(frozen=True)
class SourceConfig:
    checkpoint: str = ""  # the float model: final_model.pt, .int8.ptz or any weights file e2ettt reads; empty = the demo
    data: str = ""  # directory with *_train_*.bin and *_val_*.bin token shards (and *_val_bytes_*.bin sidecars, if any)
    tokenizer: str = ""  # SentencePiece .model matching the checkpoint's vocabulary
    model_fn: str = ""  # "module:function" or "path/file.py:function" building the model from the checkpoint path
    model_output: str = "logits"  # what forward returns: logits | method:NAME (model.NAME(ids) gives logits) | tuple:K
    artifacts: tuple = ()  # "NAME=PATH": your own quantized file, run as regime NAME (family own) beside the built-ins
    artifact_fn: str = ""  # "module:function" or "file.py:function": artifact path -> state dict; empty = built-in formats
    cache_dir: str = ""  # demo cache; empty = $E2ETTT_CACHE or ~/.cache/e2ettt
    demo: DemoConfig = field(default_factory=DemoConfig)  # the embedded demo's settings

    def validate(self) -> None:
        given = [bool(self.checkpoint), bool(self.data), bool(self.tokenizer)]
        if any(given) and not all(given):
            raise ValueError("source: --checkpoint, --data and --tokenizer go together (give all three, or none for the demo)")
        for flag, spec in (("--model-fn", self.model_fn), ("--artifact-fn", self.artifact_fn)):
            if spec and not re.match(r"^.+:[A-Za-z_]\w*$", spec):
                raise ValueError(f"{flag} must look like 'package.module:function' or 'path/file.py:function', got {spec!r}")
        if not _OUTPUT.match(self.model_output):
            raise ValueError(f"source.model_output: {self.model_output!r} is not one of {OUTPUT_RULES}")
        names = []
        for item in self.artifacts:
            name, sep, path = str(item).partition("=")
            if not sep or not path or not _ARTIFACT_NAME.match(name):
                raise ValueError(f"--artifact {item!r}: expected NAME=PATH, NAME a letter then letters, digits, _ or .")
            names.append(name)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"--artifact: {', '.join(repeated)} given more than once")

    @property
    def artifact_names(self) -> tuple[str, ...]:
        return tuple(str(a).partition("=")[0] for a in self.artifacts)


@dataclass(frozen=True)
class Inputs:
    """Resolved, checked, absolute inputs of a run (JSON-able via `as_dict`)."""

    checkpoint: str
    data: str
    tokenizer: str
    model_fn: str
    vocab_size: int
    demo: dict | None = None
    model_output: str = "logits"
    artifacts: dict = field(default_factory=dict)  # regime name -> {"path", "sha256", "bytes", "format"}
    artifact_fn: str = ""
    checkpoint_format: str = ""  # what the checkpoint file was read as
    sidecar: bool = False  # the validation shards carry byte sidecars: they give each target's bytes

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def resolve(cfg: SourceConfig, log=print) -> Inputs:
    cfg.validate()
    paths = ("checkpoint", "data", "tokenizer", "cache_dir")  # "~/golf/..." as a Ray job passes it: no shell expanded it
    cfg = replace(cfg, **{k: str(Path(getattr(cfg, k)).expanduser()) for k in paths if getattr(cfg, k)})
    if not cfg.checkpoint:
        assets = build_demo(cfg.demo, cfg.cache_dir or default_cache_dir(), log=log)
        info = {k: assets.info[k] for k in ("key", "parameters", "val_bpb", "train_tokens", "val_tokens")}
        inputs = Inputs(str(assets.checkpoint), str(assets.data_dir), str(assets.tokenizer), "", assets.model.vocab_size,
                        info, checkpoint_format="state dict in torch.save")
    else:
        vocab = int(load_tokenizer(cfg.tokenizer).vocab_size())
        ckpt = Path(cfg.checkpoint).resolve()
        model_fn = resolve_function(cfg.model_fn, "--model-fn") if cfg.model_fn else ""
        weights = None if model_fn else read_weights(ckpt)
        if weights is not None and "tok_emb.weight" in weights.state and weights.state["tok_emb.weight"].shape[0] != vocab:
            raise CheckpointError(f"{ckpt}: tok_emb.weight has {weights.state['tok_emb.weight'].shape[0]} rows but tokenizer "
                                  f"{cfg.tokenizer} has {vocab} pieces; tokenizer and checkpoint do not belong together")
        inputs = Inputs(str(ckpt), str(Path(cfg.data).resolve()), str(Path(cfg.tokenizer).resolve()), model_fn, vocab,
                        model_output=cfg.model_output, checkpoint_format=weights.format if weights else "")
        model = load_source_model(inputs)  # fails now, in the driver, with one line
        check_logits(model, vocab, cfg.tokenizer, inputs)
    data.find_shards(inputs.data, "val")
    inputs = replace(inputs, sidecar=bool(data.find_sidecars(inputs.data, "val")))
    if cfg.artifacts:
        inputs = replace(inputs, artifact_fn=resolve_function(cfg.artifact_fn, "--artifact-fn") if cfg.artifact_fn else "")
        model = load_source_model(inputs)
        found = {}
        for item in cfg.artifacts:
            name, _, path = str(item).partition("=")
            path = Path(path).expanduser().resolve()
            if not path.is_file():
                raise CheckpointError(f"--artifact {name}={path}: file does not exist")
            blob = path.read_bytes()
            entry = {"path": str(path), "sha256": hashlib.sha256(blob).hexdigest()[:16], "bytes": len(blob)}
            found[name] = {**entry, "format": fit_artifact(replace(inputs, artifacts={name: entry}), name, model)[1]}
        inputs = replace(inputs, artifacts=found)
    return inputs


# --- functions given as module:function or file.py:function ---------------------------------------------------------

def resolve_function(spec: str, flag: str) -> str:
    """`spec` as every worker can load it: "module:function" for a module this environment imports, else the
    module file's absolute path ("/abs/dir/file.py:function"); a function that cannot be found is one line."""
    target, _, fn_name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{flag} {spec!r}: {path} does not exist")
        target = str(path)
    else:
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        if found is None:  # not installed: a module in the current directory, as `python -c "import mod"` finds it
            local = Path.cwd() / (target.replace(".", "/") + ".py")
            if not local.is_file():
                raise ValueError(f"{flag} {spec!r}: no module {target!r} here or in the current directory "
                                 f"({Path.cwd()}); give path/to/file.py:{fn_name}")
            target = str(local.resolve())
    load_function(f"{target}:{fn_name}", flag)
    return f"{target}:{fn_name}"


def load_function(spec: str, flag: str = "--model-fn") -> Callable:
    target, _, fn_name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            name = "e2ettt_user_" + hashlib.sha256(target.encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:  # loaded once per process, so its classes are the same objects every time
                loader = importlib.util.spec_from_file_location(name, target)
                module = importlib.util.module_from_spec(loader)
                sys.path.insert(0, str(Path(target).parent))  # its own directory, as when run as a script
                sys.modules[name] = module
                try:
                    loader.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            module = importlib.import_module(target)
        return getattr(module, fn_name)
    except (ImportError, AttributeError, OSError, SyntaxError) as exc:
        raise ValueError(f"{flag} {spec!r}: cannot import ({type(exc).__name__}: {exc})") from None


def _spec_identity(spec: str) -> str:
    """What a function spec means, for fingerprints: a module's name, or a file's content (not where it lies)."""
    target, _, fn_name = spec.rpartition(":")
    if target.endswith(".py") and Path(target).is_file():
        return "file:" + hashlib.sha256(Path(target).read_bytes()).hexdigest() + ":" + fn_name
    return spec


# --- the model -----------------------------------------------------------------------------------------------------

_ADAPTED: dict = {}


def with_output(model: nn.Module, rule: str) -> nn.Module:
    """`model` whose forward(ids) returns logits, by `rule` (`OUTPUT_RULES`): its class is swapped for a subclass
    with that forward, so names, parameters and state dict stay the user's own."""
    if rule == "logits":
        return model
    kind, _, arg = rule.partition(":")
    cls = type(model)
    if kind == "method" and not callable(getattr(model, arg, None)):
        raise ValueError(f"--model-output {rule}: {cls.__name__} has no method {arg!r}")
    if (cls, rule) not in _ADAPTED:
        if kind == "method":
            def forward(self, ids, _m=arg, _cls=cls):
                return getattr(_cls, _m)(self, ids)
        else:
            def forward(self, ids, _k=int(arg), _cls=cls):
                return _cls.forward(self, ids)[_k]
        _ADAPTED[(cls, rule)] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                            "__qualname__": cls.__qualname__})
    model.__class__ = _ADAPTED[(cls, rule)]
    return model


def build_model(model_fn: str, checkpoint: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                output: str = "logits") -> nn.Module:
    """The user's model: `fn(checkpoint, [device=..., dtype=...])`, on `device`, its forward giving logits."""
    fn = load_function(model_fn)
    takes = inspect.signature(fn).parameters
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values())
    extra = {k: v for k, v in (("device", torch.device(device)), ("dtype", dtype or torch.float32))
             if any_kw or k in takes}
    model = fn(checkpoint, **extra)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model-fn {model_fn!r} returned {type(model).__name__}, not an nn.Module")
    return with_output(model.to(device), output)


def load_source_model(inputs: Inputs, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The checkpoint's model on `device` (a --model-fn model in whatever dtype its function gives; the baseline GPT
    keeps fp32 master weights and runs under autocast)."""
    if inputs.model_fn:
        return build_model(inputs.model_fn, inputs.checkpoint, device, dtype, inputs.model_output).eval()
    return load_model(inputs.checkpoint, vocab_size=inputs.vocab_size).to(device).eval()


@torch.no_grad()
def check_logits(model: nn.Module, vocab: int, tokenizer: str, inputs: Inputs) -> None:
    """One forward pass on four tokens: the model must map ids (B, T) to logits (B, T, vocab)."""
    ids = torch.zeros(1, 4, dtype=torch.long, device=next(model.parameters()).device)
    what = f"--model-fn {inputs.model_fn}" if inputs.model_fn else inputs.checkpoint
    try:
        out = model(ids)
    except TypeError as exc:
        raise ValueError(f"{what}: model(ids) fails ({exc}); a forward that takes targets and returns a loss needs "
                         "--model-output method:NAME naming the method that returns logits") from None
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{what}: model(ids) returned {type(out).__name__}, not logits; use --model-output tuple:K or "
                         "method:NAME")
    if out.ndim != 3 or tuple(out.shape[:2]) != (1, 4):
        raise ValueError(f"{what}: model(ids) of shape (1, 4) returned shape {tuple(out.shape)}, not logits (1, 4, V)"
                         f"{' (a loss?)' if out.ndim == 0 else ''}; use --model-output ({OUTPUT_RULES})")
    if out.shape[-1] != vocab:
        raise CheckpointError(f"{what}: the model gives logits over {out.shape[-1]} tokens but tokenizer {tokenizer} has "
                              f"{vocab} pieces; tokenizer and checkpoint do not belong together")


def source_dtypes(inputs: Inputs) -> dict[str, torch.dtype]:
    """The dtypes the checkpoint stores each tensor in (parameter-golf keeps tok_emb in bf16)."""
    if inputs.model_fn:
        return {k: v.dtype for k, v in load_source_model(inputs).state_dict().items()}
    return read_weights(inputs.checkpoint).dtypes


# --- your own artifacts --------------------------------------------------------------------------------------------

def decode_artifact(inputs: Inputs, name: str) -> Weights:
    """Artifact `name`'s weights: `--artifact-fn` (a state dict or an nn.Module), else the built-in formats."""
    path = inputs.artifacts[name]["path"]
    if not inputs.artifact_fn:
        return read_weights(path)
    out = load_function(inputs.artifact_fn, "--artifact-fn")(path)
    state = out.state_dict() if isinstance(out, nn.Module) else out
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--artifact-fn {inputs.artifact_fn}: returned {type(out).__name__} for {path}, not a state dict "
                         "of tensors or an nn.Module")
    return Weights(state, f"--artifact-fn {inputs.artifact_fn}", {k: v.dtype for k, v in state.items()})


def fit_artifact(inputs: Inputs, name: str, model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Artifact `name`'s state dict, checked to fit `model` key for key and shape for shape (one line if not)."""
    weights = decode_artifact(inputs, name)
    hint = "" if inputs.artifact_fn else " (a model that stores its weights otherwise, e.g. banked, needs --artifact-fn)"
    try:
        check_compatible(model, weights.state, f"--artifact {name}={inputs.artifacts[name]['path']}")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}{hint}") from None
    return weights.state, weights.format


def fingerprint(inputs: Inputs) -> str:
    """A short hash of what the inputs hold (not where they are): the checkpoint, the tokenizer and the
    validation shards (and their byte sidecars) byte for byte, the train shards by name and size, and the model
    function. Rows and cached artifacts are keyed by it, so a changed file is never mistaken for the old one,
    and the same files at another path on another node are recognised. Your own artifacts are not inputs but
    regimes: each is keyed by its own hash, so the rows of every regime share their fp control."""
    h = hashlib.sha256(_spec_identity(inputs.model_fn).encode() if inputs.model_fn else b"")
    if inputs.model_output != "logits":
        h.update(inputs.model_output.encode())
    for path in [inputs.checkpoint, inputs.tokenizer, *data.find_shards(inputs.data, "val"),
                 *data.find_sidecars(inputs.data, "val")]:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    for path in data.find_shards(inputs.data, "train", required=False):
        h.update(f"{path.name}:{path.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load_tables(inputs: Inputs) -> ByteTables:
    return build_byte_tables(load_tokenizer(inputs.tokenizer), inputs.vocab_size)


def load_split(inputs: Inputs, split: str, limit: int = 0) -> np.ndarray:
    return data.load_tokens(inputs.data, split, inputs.vocab_size, limit)


def load_target_bytes(inputs: Inputs, split: str = "val") -> np.ndarray | None:
    """Each token's bytes as the split's sidecars give them (aligned with `load_split`), or None without sidecars."""
    return data.load_sidecar(inputs.data, split) if inputs.sidecar else None


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
