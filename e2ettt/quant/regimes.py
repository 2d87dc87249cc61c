"""Quantization regimes as short strings, and their settings.

Forms: `fp` (the unquantized control), `pg-int8` (parameter-golf's exact
int8_clean_per_row_v1 round trip), `intN` (RTN on 2^N levels), `gptq-intN`,
`hadamard-intN`, `hadamard-gptq-intN`, with N from 2 to 8, and the same
four with `ternary` in place of `intN` (3 levels {−s, 0, s} in 2-bit codes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

FORMS = "fp, pg-int8, intN, gptq-intN, hadamard-intN, hadamard-gptq-intN (N = 2..8), and ternary in place of intN"
_PATTERN = re.compile(r"^(?P<rot>hadamard-)?(?P<gptq>gptq-)?(?:int(?P<bits>\d+)|(?P<ternary>ternary))$")
CONTROL_PATTERNS = "attn_scale,mlp_scale,resid_mix,q_gain,skip_weight"  # parameter-golf's control tensors


class RegimeError(ValueError):
    """A regime string that is not one of the valid forms."""


@dataclass(frozen=True)
class Regime:
    name: str
    method: str  # fp | pg | rtn | gptq
    bits: int  # width of a stored code; 32 for fp
    rotate: bool = False
    levels: int = 0  # grid size: 2^bits, or 3 for ternary (0 for fp and pg)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"


def parse_regime(name: str) -> Regime:
    name = name.strip()
    if name == "fp":
        return Regime("fp", "fp", 32)
    if name == "pg-int8":
        return Regime("pg-int8", "pg", 8)
    m = _PATTERN.match(name)
    if not m or (m["bits"] and not 2 <= int(m["bits"]) <= 8):
        raise RegimeError(f"unknown quantization regime {name!r}; valid forms: {FORMS}")
    bits = 2 if m["ternary"] else int(m["bits"])
    return Regime(name, "gptq" if m["gptq"] else "rtn", bits, bool(m["rot"]), 3 if m["ternary"] else 2**bits)


@dataclass(frozen=True)
class QuantConfig:
    min_numel: int = 65_536  # weights with more elements are quantized (parameter-golf's threshold)
    embed_bits: int = 8  # bits of embedding tables (RTN, or GPTQ when a linear layer shares the weight); 0 keeps them float
    clip_q: float = 1.0  # per-row clip quantile of |w| (1.0 = max)
    calib_tokens: int = 16_384  # GPTQ calibration tokens, from the train split only
    calib_seq_len: int = 256  # calibration sequence length
    gptq_block: int = 128  # lazy-batch width
    gptq_damp: float = 0.01  # damping, fraction of mean diag(H)
    act_order: bool = True  # quantize columns by decreasing diag(H)
    rotation_seed: int = 0  # seed of the Hadamard signs
    linear_types: str = "torch.nn.Linear"  # module classes (and subclasses) whose weights are quantized, comma-separated
    keep_float: str = CONTROL_PATTERNS  # name substrings never quantized, comma-separated

    def validate(self) -> None:
        if not 0.5 < self.clip_q <= 1.0:
            raise ValueError(f"quant.clip_q must be in (0.5, 1], got {self.clip_q}")
        if self.embed_bits and not 2 <= self.embed_bits <= 8:
            raise ValueError(f"quant.embed_bits must be 0 or 2..8, got {self.embed_bits}")
        if self.calib_tokens < self.calib_seq_len:
            raise ValueError(f"quant.calib_tokens={self.calib_tokens} is less than one sequence of {self.calib_seq_len}")
        if not self.linear_types.strip():
            raise ValueError("quant.linear_types must name at least one module class, e.g. torch.nn.Linear")
