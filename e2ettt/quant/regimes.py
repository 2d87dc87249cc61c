"""Quantization regimes as short strings, and their settings.

Forms (N the bits of a stored code, 2..8):

- `fp`: the unquantized control; `pg-int8`: parameter-golf's exact
  int8_clean_per_row_v1 round trip.
- Quantizers: `intN` (round to nearest), `gptq-intN`, `hadamard-intN`,
  `hadamard-gptq-intN` (QuaRot-style rotation first), on the grid
  `quant.grid` names: `symmetric` (default; 2^N − 1 levels with a zero,
  parameter-golf's [−(2^(N−1)−1), 2^(N−1)−1], so `int6` is their int6)
  or `midrise` (2^N levels, no zero); `ternary` in place of `intN` is
  {−s, 0, s}. A share suffix quantizes only a seeded share of the weights
  (`int3-0.5`); the others are stored in fp16.
- Structured damage, the SpinQuant failure class: `hadamard-intN-mismatch`
  stores the rotated, quantized weights as usual but decodes them with
  another rotation (seed + 1), `hadamard-intN-unrotated` without the
  inverse rotation; with a share suffix (`hadamard-int6-mismatch-0.25`) only
  that share of the layers is decoded wrongly. GPTQ forms too
  (`hadamard-gptq-int6-mismatch`).
- Unstructured damage: `noise-X` adds Gaussian noise of X times each row's
  RMS to every quantizable linear weight (0 < X ≤ 10), stored in fp16.
- Your own artifact: `--artifact NAME=PATH` makes NAME a regime (method and
  family `own`): the weights are what the file decodes to.

Every regime stores what it evaluates: the evaluated weights are what its
artifact decodes to.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

FORMS = ("fp, pg-int8, intN, gptq-intN, hadamard-intN, hadamard-gptq-intN (N = 2..8; ternary in place of intN), each "
         "with an optional share -S (0 < S < 1); hadamard-[gptq-]intN-mismatch[-S] and -unrotated[-S]; noise-X (0 < X <= 10); "
         "the NAME of an --artifact NAME=PATH")
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PATTERN = re.compile(rf"^(?P<rot>hadamard-)?(?P<gptq>gptq-)?(?:int(?P<bits>\d+)|(?P<ternary>ternary))"
                      rf"(?:-(?P<decode>mismatch|unrotated))?(?:-(?P<share>{_NUMBER}))?$")
_NOISE = re.compile(rf"^noise-(?P<size>{_NUMBER})$")
# parameter-golf's control tensors (per-channel scales, mixes, gains, skip weights; singular or plural names):
# kept in float by its int8 export, never quantized, and what `norms` adapts beside the 1-D parameters
CONTROL_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")
GRIDS = ("symmetric", "midrise")


class RegimeError(ValueError):
    """A regime string that is not one of the valid forms, or a strength out of range."""


@dataclass(frozen=True)
class Regime:
    name: str
    method: str  # fp | pg | rtn | gptq | noise | own
    bits: int  # width of a stored code; 32 for fp, 16 for noise (fp16 storage)
    rotate: bool = False
    ternary: bool = False
    decode: str = "right"  # right | mismatch (another rotation) | unrotated (no inverse rotation)
    share: float = 1.0  # share of the weights quantized (or, for mismatch/unrotated, decoded wrongly)
    noise: float = 0.0  # noise-X: X

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @property
    def family(self) -> str:
        """What kind of damage the regime does, for analysis: control, parameter-golf int8, a quantizer, structured
        (a wrong decode of rotated weights) or unstructured (noise)."""
        if self.method in ("fp", "pg", "noise", "own"):
            return {"fp": "control", "pg": "pg-int8", "noise": "unstructured", "own": "own"}[self.method]
        if self.decode != "right":
            return "structured"
        return ("hadamard-" if self.rotate else "") + self.method

    @property
    def draws(self) -> bool:
        """Whether the regime's damage is a random draw (a share of the weights, a wrong rotation, noise)."""
        return self.family in ("structured", "unstructured") or self.share < 1

    @property
    def strength(self) -> float:
        """The family's knob: the noise size, or the share of weights a regime treats."""
        return self.noise if self.method == "noise" else self.share

    def levels(self, grid: str = "symmetric") -> int:
        """Grid size: 3 for ternary, else 2^bits − 1 (symmetric, with a zero) or 2^bits (midrise)."""
        if self.ternary:
            return 3
        return 2**self.bits - (1 if grid == "symmetric" else 0)


def parse_regime(name: str, own: Collection[str] = ()) -> Regime:
    """The regime a string names; `own` holds the names of the user's own artifacts (`--artifact NAME=PATH`)."""
    name = name.strip()
    if name in own:
        return Regime(name, "own", 0)
    if name == "fp":
        return Regime("fp", "fp", 32)
    if name == "pg-int8":
        return Regime("pg-int8", "pg", 8)
    if m := _NOISE.match(name):
        size = float(m["size"])
        if not 0 < size <= 10:
            raise RegimeError(f"regime {name!r}: the noise size must be in (0, 10], got {size:g}")
        return Regime(name, "noise", 16, noise=size)
    m = _PATTERN.match(name)
    if not m or (m["bits"] and not 2 <= int(m["bits"]) <= 8):
        raise RegimeError(f"unknown quantization regime {name!r}; valid forms: {FORMS}")
    if m["decode"] and not m["rot"]:
        raise RegimeError(f"regime {name!r}: -{m['decode']} decodes rotated weights wrongly, so it needs hadamard-")
    share = float(m["share"]) if m["share"] else 1.0
    if not 0 < share <= 1:
        raise RegimeError(f"regime {name!r}: the share must be in (0, 1], got {share:g}")
    bits = 2 if m["ternary"] else int(m["bits"])
    return Regime(name, "gptq" if m["gptq"] else "rtn", bits, bool(m["rot"]), bool(m["ternary"]),
                  m["decode"] or "right", share)


@dataclass(frozen=True)
class QuantConfig:
    min_numel: int = 65_536  # weights with more elements are quantized (parameter-golf's threshold)
    embed_bits: int = 8  # bits of embedding tables (RTN, or GPTQ when a linear layer shares the weight); 0 keeps them float
    grid: str = "symmetric"  # symmetric: 2^b - 1 levels with a zero, as parameter-golf's intN; midrise: 2^b, no zero
    clip_q: float = 1.0  # per-row clip quantile of |w| (1.0 = max)
    calib_tokens: int = 16_384  # GPTQ calibration tokens, in sequences spread across the train split (never validation)
    calib_seq_len: int = 256  # calibration sequence length
    gptq_block: int = 128  # lazy-batch width
    gptq_damp: float = 0.01  # damping, fraction of mean diag(H)
    act_order: bool = True  # quantize columns by decreasing diag(H)
    rotation_seed: int = 0  # seed of the Hadamard signs, of the shares of weights treated, and of the noise
    linear_types: str = "torch.nn.Linear"  # module classes (and subclasses) whose weights are quantized, comma-separated
    keep_float: str = ",".join(CONTROL_PATTERNS)  # name substrings never quantized, comma-separated
    min_share: float = 0.9  # a regime must reach this share of the matrix parameters above min_numel, or it is refused
    draw_per_seed: bool = True  # damage families draw their shares, rotations and noise anew per seed (rotation_seed + seed)

    def validate(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"quant.grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if not 0.5 < self.clip_q <= 1.0:
            raise ValueError(f"quant.clip_q must be in (0.5, 1], got {self.clip_q}")
        if self.embed_bits and not 2 <= self.embed_bits <= 8:
            raise ValueError(f"quant.embed_bits must be 0 or 2..8, got {self.embed_bits}")
        if self.calib_tokens < self.calib_seq_len:
            raise ValueError(f"quant.calib_tokens={self.calib_tokens} is less than one sequence of {self.calib_seq_len}")
        if not 0 <= self.min_share <= 1:
            raise ValueError(f"quant.min_share must be in [0, 1], got {self.min_share}")
        if not self.linear_types.strip():
            raise ValueError("quant.linear_types must name at least one module class, e.g. torch.nn.Linear")
