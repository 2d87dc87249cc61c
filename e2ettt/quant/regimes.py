"""Quantization regimes as short strings, and their settings.

Forms: `fp` (the unquantized control), `pg-int8` (parameter-golf's exact
int8_clean_per_row_v1 round trip), `intN` (RTN), `gptq-intN`,
`hadamard-intN`, `hadamard-gptq-intN`, with N from 2 to 8.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

FORMS = "fp, pg-int8, intN, gptq-intN, hadamard-intN, hadamard-gptq-intN (N = 2..8)"
_PATTERN = re.compile(r"^(?P<rot>hadamard-)?(?P<gptq>gptq-)?int(?P<bits>\d+)$")


class RegimeError(ValueError):
    """A regime string that is not one of the valid forms."""


@dataclass(frozen=True)
class Regime:
    name: str
    method: str  # fp | pg | rtn | gptq
    bits: int  # 32 for fp
    rotate: bool = False

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
    if not m or not 2 <= int(m["bits"]) <= 8:
        raise RegimeError(f"unknown quantization regime {name!r}; valid forms: {FORMS}")
    return Regime(name, "gptq" if m["gptq"] else "rtn", int(m["bits"]), bool(m["rot"]))


@dataclass(frozen=True)
class QuantConfig:
    min_numel: int = 65_536  # 2-D weights with more elements are quantized (parameter-golf's threshold)
    embed_bits: int = 8  # bits of the tied embedding (RTN); 0 keeps it float
    clip_q: float = 1.0  # per-row clip quantile of |w| (1.0 = max)
    calib_tokens: int = 16_384  # GPTQ calibration tokens, from the train split only
    calib_seq_len: int = 256  # calibration sequence length
    gptq_block: int = 128  # lazy-batch width
    gptq_damp: float = 0.01  # damping, fraction of mean diag(H)
    act_order: bool = True  # quantize columns by decreasing diag(H)
    rotation_seed: int = 0  # seed of the Hadamard signs

    def validate(self) -> None:
        if not 0.5 < self.clip_q <= 1.0:
            raise ValueError(f"quant.clip_q must be in (0.5, 1], got {self.clip_q}")
        if self.embed_bits and not 2 <= self.embed_bits <= 8:
            raise ValueError(f"quant.embed_bits must be 0 or 2..8, got {self.embed_bits}")
        if self.calib_tokens < self.calib_seq_len:
            raise ValueError(f"quant.calib_tokens={self.calib_tokens} is less than one sequence of {self.calib_seq_len}")
