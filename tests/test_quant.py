import io
import zlib

import numpy as np
import pytest
import torch

from e2ettt import data
from e2ettt.checkpoint import load_state_dict
from e2ettt.demo import load_demo_model
from e2ettt.quant import pg_int8
from e2ettt.quant.apply import quantize_model
from e2ettt.quant.artifact import pack_codes
from e2ettt.quant.gptq import gptq, proxy_loss
from e2ettt.quant.hadamard import RotatedLinear, Rotation, fwht
from e2ettt.quant.regimes import QuantConfig, RegimeError, parse_regime
from e2ettt.quant.rtn import rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_rtn_is_idempotent_and_within_half_a_step(bits):
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits))
    q = rtn(W, bits)
    assert q.codes.abs().max() <= 2 ** (bits - 1) - 1
    assert ((W - q.Q).abs() <= q.scales[:, None] / 2 + 1e-6).all()
    torch.testing.assert_close(rtn(q.Q, bits).Q, q.Q, rtol=0, atol=1e-6)


def test_parse_regimes_and_unknown_regime():
    spec = parse_regime("hadamard-gptq-int3")
    assert spec.__dict__ == {"name": "hadamard-gptq-int3", "method": "gptq", "bits": 3, "rotate": True}
    assert parse_regime("int6").method == "rtn" and parse_regime("pg-int8").method == "pg"
    for bad in ("int1", "int9", "gptq", "fp16", "hadamard-fp", "int4-gptq"):
        with pytest.raises(RegimeError, match=f"unknown quantization regime '{bad}'; valid forms: fp, pg-int8, intN"):
            parse_regime(bad)


def test_gptq_beats_rtn_on_its_proxy_loss_for_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated features
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(32, 64, generator=g)
    for bits in (3, 4):
        assert proxy_loss(W, gptq(W, H, bits, block=16).Q, H) < proxy_loss(W, rtn(W, bits).Q, H)


@pytest.fixture(scope="module")
def demo_parts(tiny_demo):
    model = load_demo_model(tiny_demo)
    calib = torch.as_tensor(data.load_tokens(tiny_demo.data_dir, "train"))
    return model, calib


@pytest.mark.parametrize("regime", ["gptq-int3", "gptq-int4", "hadamard-gptq-int4"])
def test_gptq_proxy_loss_at_most_rtn_on_every_layer_of_the_demo_model(demo_parts, regime):
    model, calib = demo_parts
    cfg = QuantConfig(min_numel=1024, calib_tokens=4096, calib_seq_len=128)
    _, report = quantize_model(model, parse_regime(regime), cfg, calib)
    layers = [t for t in report.tensors if "proxy_loss" in t]
    assert len(layers) == 6 * model.cfg.num_layers
    for t in layers:
        assert t["proxy_loss"] <= t["rtn_proxy_loss"], t["name"]


def test_quantize_model_leaves_the_original_alone_and_passes_control_tensors(demo_parts):
    model, calib = demo_parts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q, report = quantize_model(model, parse_regime("int4"), QuantConfig(min_numel=1024))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sd = q.state_dict()
    assert torch.equal(sd["blocks.0.resid_mix"], before["blocks.0.resid_mix"])  # control tensors stay fp32
    assert report.quantized_params == sum(v.numel() for k, v in before.items() if v.ndim == 2 and v.numel() > 1024)
    assert 0 < report.artifact_bytes_lzma < sum(v.numel() * 4 for v in before.values()) / 4


def test_rotation_preserves_the_float_function(demo_parts):
    model, _ = demo_parts
    ref = model.double()
    rotated = __import__("copy").deepcopy(ref)
    for module in list(rotated.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                R = Rotation(child.weight.shape[1], seed=hash(child_name) % 1000)
                setattr(module, child_name, RotatedLinear(R.apply(child.weight.detach()), R))
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rotated(ids), ref(ids), rtol=0, atol=1e-5)
    model.float()


def test_fwht_and_rotations_are_orthogonal():
    n = 16
    H = torch.tensor([[1.0]])
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ H.double())
    for width in (64, 48):  # Hadamard and random-orthogonal paths
        R = Rotation(width, seed=3)
        y = torch.randn(5, width, dtype=torch.float64)
        torch.testing.assert_close(R.inverse(R.apply(y)), y)
        torch.testing.assert_close(R.apply(y).norm(dim=1), y.norm(dim=1))
        Hm = torch.randn(width, width, dtype=torch.float64)
        Hm = Hm @ Hm.T
        W = torch.randn(4, width, dtype=torch.float64)
        # tr((WR) RᵀHR (WR)ᵀ) == tr(W H Wᵀ): the GPTQ objective is rotation invariant
        torch.testing.assert_close(torch.trace(R.apply(W) @ R.conjugate(Hm) @ R.apply(W).T), torch.trace(W @ Hm @ W.T))


def _reference_int8(w: torch.Tensor):
    """parameter-golf's per-row rule written out: quantile clip, scale = max(clip/127, 1/127) in fp16."""
    clip = torch.quantile(w.abs(), 0.9999984, dim=1)
    scale = torch.clamp(clip / 127.0, min=1.0 / 127.0)
    q = torch.clamp(torch.round(torch.clamp(w, -clip[:, None], clip[:, None]) / scale[:, None]), -127, 127)
    return q.to(torch.int8), scale.half()


def test_pg_int8_matches_the_format_and_round_trips_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"blocks.0.mlp.fc.weight": torch.randn(512, 256, generator=g) * 0.05,
          "blocks.0.attn_scale": torch.rand(256, generator=g), "small.weight": torch.randn(64, 64, generator=g),
          "tok_emb.weight": torch.randn(1024, 128, generator=g).bfloat16()}
    obj = pg_int8.quantize_state_dict(sd)
    q_ref, s_ref = _reference_int8(sd["blocks.0.mlp.fc.weight"])
    assert torch.equal(obj["quantized"]["blocks.0.mlp.fc.weight"], q_ref)
    assert torch.equal(obj["scales"]["blocks.0.mlp.fc.weight"], s_ref)
    assert obj["qmeta"]["blocks.0.mlp.fc.weight"] == {"scheme": "per_row", "axis": 0}
    assert obj["passthrough"]["blocks.0.attn_scale"].dtype == torch.float32
    assert obj["passthrough"]["small.weight"].dtype == torch.float16
    assert obj["passthrough_orig_dtypes"]["small.weight"] == "float32"
    assert obj["dtypes"]["tok_emb.weight"] == "bfloat16"
    # an artifact as parameter-golf writes it (torch.save + zlib 9) reads back to the same tensors
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = tmp_path / "final_model.int8.ptz"
    path.write_bytes(zlib.compress(buf.getvalue(), level=9))
    loaded = load_state_dict(path)
    direct = pg_int8.dequantize_state_dict(obj)
    assert set(loaded) == set(sd)
    for k in sd:
        assert torch.equal(loaded[k], direct[k]) and loaded[k].dtype == sd[k].dtype
    torch.testing.assert_close(direct["blocks.0.mlp.fc.weight"],
                               q_ref.float() * s_ref.float()[:, None], rtol=0, atol=0)
    deq, nbytes = pg_int8.round_trip(sd)
    assert nbytes == len(pg_int8.pack(obj)) and all(torch.equal(deq[k], direct[k]) for k in sd)


def test_packed_codes_take_bits_per_entry():
    codes = torch.randint(-3, 4, (1000,)).to(torch.int8)
    packed = pack_codes(codes, 3)
    assert len(packed) == (1000 * 3 + 7) // 8
    bits = np.unpackbits(np.frombuffer(packed, np.uint8))[: 3000].reshape(-1, 3)
    back = bits @ np.array([4, 2, 1]) - 3
    np.testing.assert_array_equal(back, codes.numpy())
