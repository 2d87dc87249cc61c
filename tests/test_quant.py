import io
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2ettt import data
from e2ettt.checkpoint import load_model, load_state_dict
from e2ettt.quant import pg_int8
from e2ettt.quant.apply import Target, quantize_model, select_targets, treated_share
from e2ettt.quant.artifact import compressed_sizes as artifact_sizes
from e2ettt.quant.artifact import decode, pack_codes, unpack_codes
from e2ettt.quant.gptq import gptq, proxy_loss
from e2ettt.quant.hadamard import Rotation, fwht
from e2ettt.quant.regimes import QuantConfig, RegimeError, parse_regime
from e2ettt.quant.rtn import rtn


class RotatedLinear(nn.Module):
    """y = (x R)(W R)ᵀ: the run-time form of an input-side rotated layer, to check that a rotation preserves the
    function the layer computes."""

    def __init__(self, weight_rotated: Tensor, R: Rotation):
        super().__init__()
        self.weight_rotated = nn.Parameter(weight_rotated, requires_grad=False)
        self.R = R

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.R.apply(x), self.weight_rotated.to(x.dtype))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_rtn_uses_all_2_to_the_b_levels_within_half_a_step_with_fp16_scales(bits):
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits))
    q = rtn(W, 2**bits)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert torch.equal(q.scales, q.scales.half().float())  # the scales are the stored fp16 values
    assert ((W - q.Q).abs() <= q.scales[:, None] / 2 + 1e-6).all()
    assert torch.equal(q.Q, (q.codes.float() - (2**bits - 1) / 2) * q.scales[:, None])  # the rule, written out
    if bits == 2:
        assert q.Q[0].unique().numel() == 4  # a true 4-level code, not ternary
    torch.testing.assert_close(rtn(q.Q, 2**bits).Q, q.Q, rtol=0, atol=1e-6)


def test_grids_symmetric_with_a_zero_as_parameter_golf_or_midrise_and_ternary():
    spec = parse_regime("ternary")
    assert (spec.bits, spec.levels(), spec.method) == (2, 3, "rtn")
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q = rtn(W, spec.levels())
    assert set(q.codes.unique().tolist()) <= {0, 1, 2} and q.Q[0].unique().numel() == 3
    assert parse_regime("hadamard-gptq-ternary").levels("midrise") == 3
    assert parse_regime("int6").levels("symmetric") == 63 and parse_regime("int6").levels("midrise") == 64
    q6 = rtn(W, parse_regime("int6").levels())  # parameter-golf's int6: codes -31..31 around a zero level
    assert ((q6.codes.float() - 31) * q6.scales[:, None] == q6.Q).all() and (q6.Q == 0).any()
    assert torch.equal(q6.scales, (W.abs().amax(dim=1) / 31).half().float())


def test_parse_regimes_and_unknown_regime():
    spec = parse_regime("hadamard-gptq-int3")
    assert (spec.method, spec.bits, spec.rotate, spec.decode, spec.share, spec.family) == ("gptq", 3, True, "right", 1.0,
                                                                                          "hadamard-gptq")
    assert parse_regime("int6").method == "rtn" and parse_regime("pg-int8").method == "pg"
    wrong = parse_regime("hadamard-gptq-int6-mismatch-0.25")
    assert (wrong.decode, wrong.share, wrong.family, wrong.strength) == ("mismatch", 0.25, "structured", 0.25)
    assert parse_regime("hadamard-int6-unrotated").decode == "unrotated"
    noise = parse_regime("noise-0.3")
    assert (noise.method, noise.noise, noise.family, noise.strength) == ("noise", 0.3, "unstructured", 0.3)
    assert parse_regime("int3-0.5").share == 0.5 and parse_regime("int3-0.5").family == "rtn"
    for bad in ("int1", "int9", "gptq", "fp16", "hadamard-fp", "int4-gptq", "ternary-gptq", "noise", "int3-mismatch2"):
        with pytest.raises(RegimeError, match=f"unknown quantization regime '{bad}'; valid forms: fp, pg-int8, intN"):
            parse_regime(bad)
    for bad, why in (("noise-11", "the noise size must be in \\(0, 10\\], got 11"), ("noise-0", "must be in \\(0, 10\\]"),
                     ("int3-1.5", "the share must be in \\(0, 1\\], got 1.5"), ("int6-mismatch", "needs hadamard-")):
        with pytest.raises(RegimeError, match=why):
            parse_regime(bad)


def test_gptq_beats_rtn_on_its_proxy_loss_for_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated features
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(32, 64, generator=g)
    for bits in (3, 4):
        assert proxy_loss(W, gptq(W, H, 2**bits, block=16).Q, H) < proxy_loss(W, rtn(W, 2**bits).Q, H)


@pytest.fixture(scope="module")
def demo_parts(tiny_demo):
    model = load_model(tiny_demo.checkpoint, tiny_demo.model, vocab_size=tiny_demo.model.vocab_size)
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
    codes = torch.randint(0, 8, (1000,)).to(torch.uint8)
    packed = pack_codes(codes, 3)
    assert len(packed) == (1000 * 3 + 7) // 8
    bits = np.unpackbits(np.frombuffer(packed, np.uint8))[: 3000].reshape(-1, 3)
    np.testing.assert_array_equal(bits @ np.array([4, 2, 1]), codes.numpy())  # MSB first, written out
    assert torch.equal(unpack_codes(packed, 3, 1000), codes)


def test_codes_of_any_integer_dtype_and_shape_pack_row_by_row_and_unpack_as_uint8():
    codes = torch.tensor([[5, 0, 7], [1, 6, 2]])  # int64, (2, 3): 101 000 111 001 110 010, row by row
    packed = pack_codes(codes, 3)
    assert packed == bytes([0b10100011, 0b10011100, 0b10000000])
    got = unpack_codes(packed, 3, 6)
    assert got.dtype == torch.uint8 and got.tolist() == [5, 0, 7, 1, 6, 2]


@pytest.mark.parametrize("regime", ["int3", "gptq-int3", "hadamard-gptq-int4", "ternary", "int3-0.5", "noise-0.5",
                                    "hadamard-int6-mismatch-0.25", "hadamard-gptq-int4-unrotated"])
def test_the_evaluated_weights_are_what_the_stored_artifact_decodes_to(demo_parts, regime):
    """The model quantize_model returns holds exactly the weights that the saved artifact reads back to."""
    model, calib = demo_parts
    cfg = QuantConfig(min_numel=1024, calib_tokens=2048, calib_seq_len=128)
    q, report = quantize_model(model, parse_regime(regime), cfg, calib)
    buf = io.BytesIO()
    torch.save(report.artifact, buf)
    stored = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    weights = decode(stored)
    for name, tensor in q.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    for e in stored["quantized"].values():  # the format's rule, written out: fp16 scales, b-bit codes
        assert e["scales"].dtype == torch.float16 and len(e["codes"]) == (e["shape"][0] * e["shape"][1] * e["bits"] + 7) // 8
    assert stored["passthrough"]["blocks.0.resid_mix"].dtype == torch.float32
    assert stored["passthrough"]["blocks.0.attn.q_gain"].dtype == torch.float32


def _reference_pg_round_trip(sd: dict) -> dict:
    """parameter-golf's int8_clean_per_row_v1 round trip written out: each tensor comes back in its own dtype."""
    control = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")
    out = {}
    for name, t in sd.items():
        if t.numel() <= 65_536:
            out[name] = t.float() if any(c in name for c in control) else t.to(torch.float16).to(t.dtype)
        else:
            q, s = _reference_int8(t.float())
            out[name] = (q.float() * s.float()[:, None]).to(t.dtype)
    return out


def test_pg_int8_evaluates_what_parameter_golf_stores_bf16_embedding_included():
    from e2ettt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1024, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["tok_emb.weight"] = sd["tok_emb.weight"].bfloat16()  # as parameter-golf's final_model.pt keeps it
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    q, report = quantize_model(model, parse_regime("pg-int8"), QuantConfig(), dtypes={k: v.dtype for k, v in sd.items()})
    expected = _reference_pg_round_trip(sd)
    got = q.state_dict()
    assert expected["tok_emb.weight"].dtype == torch.bfloat16
    for name in sd:
        assert torch.equal(got[name], expected[name].float()), name
    fp32_round_trip = _reference_pg_round_trip({k: v.float() for k, v in sd.items()})["tok_emb.weight"]
    assert not torch.equal(fp32_round_trip.float(), got["tok_emb.weight"])  # the dtype matters: the test can fail
    assert {t["name"] for t in report.tensors} == {"tok_emb.weight"} | {k for k, v in sd.items() if v.numel() > 65_536}


# ---------------------------------------------------------------- any nn.Module (the LoopLM example)

@pytest.fixture(scope="module")
def loop_model():
    from e2ettt.examples.loop_lm import LoopConfig, LoopLM

    torch.manual_seed(0)
    model = LoopLM(LoopConfig(vocab_size=256, dim=64, heads=4, loops=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    calib = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
    return model.eval(), calib


LOOP_CFG = QuantConfig(min_numel=1024, calib_tokens=2048, calib_seq_len=64)


@pytest.mark.parametrize("regime", ["gptq-int3", "gptq-int4", "hadamard-gptq-int4"])
def test_gptq_beats_rtn_on_every_layer_of_a_model_it_does_not_know(loop_model, regime):
    model, calib = loop_model
    _, report = quantize_model(model, parse_regime(regime), LOOP_CFG, calib)
    layers = [t for t in report.tensors if "proxy_loss" in t]
    names = {t["name"] for t in layers}
    assert {"core.wq.weight", "core.wkv.weight", "core.down.weight", "embed.weight"} <= names
    assert len(layers) == 5 * 3 + 1  # five linears in each of three blocks, and the tied head/embedding
    for t in layers:
        assert t["proxy_loss"] <= t["rtn_proxy_loss"], t["name"]


def test_a_shared_weight_is_quantized_once_with_the_hessian_of_every_use(loop_model):
    model, calib = loop_model
    q, report = quantize_model(model, parse_regime("gptq-int4"), LOOP_CFG, calib)
    names = [t["name"] for t in report.tensors]
    assert len(names) == len(set(names))  # every weight once
    table = next(t for t in report.tensors if t["name"] == "embed.weight")
    assert set(table["uses"]) == {"head", "embed"} and table["bits"] == LOOP_CFG.embed_bits
    assert q.head.weight is q.embed.weight  # still one tensor after quantization
    assert "head.weight" not in report.artifact["passthrough"] and "embed.weight" in report.artifact["quantized"]
    assert any("shared weights quantized once" in n for n in report.notes)
    # the core block runs twice per forward: its Hessian sums both uses (differs from the first use alone)
    from e2ettt.quant.apply import _calibration_batches, _call_groups, select_targets

    work = __import__("copy").deepcopy(model)
    targets = select_targets(work, LOOP_CFG)
    groups, uses = _call_groups(work, _calibration_batches(calib, LOOP_CFG), {k: t for k, t in targets.items() if t.linears})
    assert uses["core.wq.weight"] == 2 and uses["prelude.wq.weight"] == 1
    assert [targets[k].name for k in groups[0]] == ["prelude.wq.weight", "prelude.wkv.weight"]  # one input, one group


def test_a_rotated_regime_evaluates_weights_as_near_the_originals_as_without_rotation(loop_model):
    """Rotation is a change of basis to quantize in, not damage: what a hadamard regime evaluates is W R quantized
    and rotated back, as close to W as plain int8 (weights left in the rotated basis are ~1.4 W away)."""
    model, _ = loop_model
    original = model.state_dict()
    for regime in ("int8", "hadamard-int8"):
        q, report = quantize_model(model, parse_regime(regime), LOOP_CFG)
        names = [t["name"] for t in report.tensors]
        assert len(names) == 17  # 15 linear weights, the tied embedding and the position table
        for name in names:
            W, Q = original[name], q.state_dict()[name]
            assert (Q - W).norm() < 0.02 * W.norm(), (regime, name)


def test_the_embedding_is_stored_as_codes_at_embed_bits_unless_kept_float(random_gpt):
    q, report = quantize_model(random_gpt, parse_regime("int4"), QuantConfig(min_numel=1024))
    table = next(t for t in report.tensors if t["name"] == "tok_emb.weight")
    assert table["bits"] == 8 and report.artifact["quantized"]["tok_emb.weight"]["bits"] == 8
    assert not torch.equal(q.tok_emb.weight, random_gpt.tok_emb.weight)
    kept, report = quantize_model(random_gpt, parse_regime("int4"), QuantConfig(min_numel=1024, embed_bits=0))
    assert "tok_emb.weight" in report.artifact["passthrough"] and "tok_emb.weight" not in report.artifact["quantized"]


def test_gptq_calibrates_on_the_train_split_never_on_validation(tmp_path):
    from e2ettt.artifacts import calibration_tokens
    from e2ettt.source import Inputs

    data.write_shard(tmp_path / "x_train_000000.bin", np.full(5000, 7))
    data.write_shard(tmp_path / "x_val_000000.bin", np.full(5000, 9))
    calib = calibration_tokens(Inputs("/ckpt.pt", str(tmp_path), "/tok.model", "", 1024),
                               QuantConfig(calib_tokens=1024, calib_seq_len=128))
    assert calib.size == 1024 and set(calib.tolist()) == {7}


def test_rotation_preserves_the_function_of_a_model_it_does_not_know(loop_model):
    model, _ = loop_model
    ref = __import__("copy").deepcopy(model).double()
    rotated = __import__("copy").deepcopy(ref)
    for module in list(rotated.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                R = Rotation(child.weight.shape[1], seed=len(child_name))
                linear = RotatedLinear(R.apply(child.weight.detach()), R)
                if child.bias is not None:
                    linear.forward = lambda x, lin=linear, b=child.bias: RotatedLinear.forward(lin, x) + b
                setattr(module, child_name, linear)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rotated(ids), ref(ids), rtol=0, atol=1e-5)


def _reference_gptq_for_the_baseline_gpt(model, regime, cfg, calib):
    """The class-aware walk GPTQ took before it knew nothing of the architecture: block by block, inside a
    block q/k/v, then attn proj, mlp fc, mlp proj, each from inputs through the already-quantized layers."""
    from e2ettt.model import rms_norm
    from e2ettt.quant.apply import _calibration_batches, _quantize_weight
    from e2ettt.quant.artifact import decode_entry, entry

    out = __import__("copy").deepcopy(model).float().eval()
    params = dict(out.named_parameters())

    def quantize(name, H, bits):
        seed = cfg.rotation_seed * 1_000_003 + zlib.crc32(name.encode()) if regime.rotate else None
        levels = 2**bits - 1  # the symmetric grid, written out
        q = _quantize_weight(params[name].detach(), levels, regime, cfg, H, seed)
        params[name].data.copy_(decode_entry(entry(q.codes, q.scales, bits, levels, seed)))

    quantize("tok_emb.weight", None, cfg.embed_bits)
    with torch.no_grad():
        x = rms_norm(out.tok_emb(_calibration_batches(calib, cfg)))
        x0, skips = x, []
        for i, block in enumerate(out.blocks):
            if i >= out.num_encoder_layers and skips:
                x = x + out.skip_weights[i - out.num_encoder_layers][None, None] * skips.pop()
            for group in (("attn.c_q", "attn.c_k", "attn.c_v"), ("attn.proj",), ("mlp.fc",), ("mlp.proj",)):
                sums, rows, hooks = {}, {}, []
                for g in group:
                    def hook(_m, args, g=g, sums=sums, rows=rows):
                        a = args[0].reshape(-1, args[0].shape[-1]).double()
                        sums[g], rows[g] = a.T @ a, a.shape[0]
                    hooks.append(block.get_submodule(g).register_forward_pre_hook(hook))
                block(x, x0)
                for h in hooks:
                    h.remove()
                for g in group:
                    quantize(f"blocks.{i}.{g}.weight", (2.0 * sums[g] / rows[g]).float(), regime.bits)
            x = block(x, x0)
            if i < out.num_encoder_layers:
                skips.append(x)
    return out


@pytest.mark.parametrize("regime", ["gptq-int3", "hadamard-gptq-int4"])
def test_the_architecture_blind_walk_gives_the_baseline_gpt_the_same_weights(demo_parts, regime):
    model, calib = demo_parts
    cfg = QuantConfig(min_numel=1024, calib_tokens=2048, calib_seq_len=128)
    got, _ = quantize_model(model, parse_regime(regime), cfg, calib)
    want = _reference_gptq_for_the_baseline_gpt(model, parse_regime(regime), cfg, calib)
    for name, tensor in want.state_dict().items():
        if tensor.ndim == 2 and tensor.numel() > 1024:
            assert torch.equal(got.state_dict()[name], tensor), name


def test_damage_families_treat_what_they_say(demo_parts):
    """A wrong decode hits a share of the weights and only those; noise has the size it names; a share quantizes
    only that share."""
    from e2ettt.quant.artifact import decode_entry

    model, calib = demo_parts
    cfg = QuantConfig(min_numel=1024, calib_tokens=2048, calib_seq_len=128)
    right, _ = quantize_model(model, parse_regime("hadamard-int6"), cfg)
    wrong, report = quantize_model(model, parse_regime("hadamard-int6-mismatch-0.25"), cfg)
    weights = [t["name"] for t in report.tensors]
    differ = [n for n in weights if not torch.equal(right.state_dict()[n], wrong.state_dict()[n])]
    assert len(differ) == round(0.25 * len(weights)) == len(report.selection["treated"])  # embedding among the candidates
    for n in differ:  # decoded with the rotation of the next seed: the stored entry says so, and it is far off
        e = report.artifact["quantized"][n]
        assert torch.equal(decode_entry(e), wrong.state_dict()[n])
        assert (wrong.state_dict()[n] - model.state_dict()[n]).norm() > 0.5 * model.state_dict()[n].norm()
    noisy, _ = quantize_model(model, parse_regime("noise-0.5"), cfg)
    W, N = model.state_dict()["blocks.0.mlp.fc.weight"], noisy.state_dict()["blocks.0.mlp.fc.weight"]
    rel = ((N - W).square().mean(dim=1) / W.square().mean(dim=1)).sqrt()
    assert rel.mean().item() == pytest.approx(0.5, rel=0.1)
    half, rep = quantize_model(model, parse_regime("int3-0.5"), cfg)
    quantized = [t for t in rep.tensors if t["bits"] == 3]
    assert len(quantized) == round(0.5 * sum(1 for t in rep.tensors if t["name"] != "tok_emb.weight"))


def test_a_model_with_nothing_to_quantize_is_refused_with_one_line():
    from e2ettt.quant.apply import QuantSelectionError

    tiny = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    with pytest.raises(QuantSelectionError, match="regime int4: Sequential has no weight to quantize"):
        quantize_model(tiny, parse_regime("int4"), QuantConfig())


def _reference_int8_one_scale(t: Tensor) -> tuple[Tensor, Tensor]:
    """parameter-golf's rule for a large float tensor that is not a matrix: one fp32 scale, clip/127 (1 when the
    clip is 0), codes clamped to ±127."""
    t = t.float()
    clip = float(torch.quantile(t.abs().flatten(), 0.9999984)) if t.numel() else 0.0
    scale = torch.tensor(clip / 127.0 if clip > 0 else 1.0, dtype=torch.float32)
    return torch.clamp(torch.round(torch.clamp(t, -clip, clip) / scale), -127, 127).to(torch.int8), scale


def test_pg_int8_gives_a_large_tensor_that_is_not_a_matrix_one_scale():
    """A bank (3-D, bf16) and a vector over 65,536 elements: one fp32 scale each, codes by parameter-golf's rule; an
    all-zero one gets scale 1; the clip is below 1 here, so clip/127 is taken as it is."""
    g = torch.Generator().manual_seed(4)
    sd = {"bank": (torch.randn(4, 130, 140, generator=g) * 0.01).bfloat16(),
          "vector": torch.randn(70_000, generator=g) * 0.02, "zeros": torch.zeros(66_000)}
    obj = pg_int8.quantize_state_dict(sd)
    for name, t in sd.items():
        q, s = _reference_int8_one_scale(t)
        assert torch.equal(obj["quantized"][name], q) and obj["quantized"][name].dtype == torch.int8, name
        assert obj["scales"][name].dtype == torch.float32 and obj["scales"][name].ndim == 0
        assert torch.equal(obj["scales"][name], s), name
        assert name not in obj["qmeta"]  # one scale, not per row
    assert float(obj["scales"]["zeros"]) == 1.0 and 0 < float(obj["scales"]["vector"]) < 1 / 127
    assert obj["dtypes"] == {"bank": "bfloat16", "vector": "float32", "zeros": "float32"}
    out = pg_int8.dequantize_state_dict(obj)
    for name, t in sd.items():
        q, s = _reference_int8_one_scale(t)
        assert out[name].dtype == t.dtype and torch.equal(out[name], (q.float() * float(s)).to(t.dtype)), name


def test_pg_int8_quantizes_empty_tensors_to_empty_codes():
    q, s = pg_int8.quantize_tensor(torch.zeros(0, 4))
    assert q.shape == (0, 4) and s.shape == (0,) and s.dtype == torch.float16
    q, s = pg_int8.quantize_tensor(torch.zeros(0))
    assert q.shape == (0,) and float(s) == 1.0


def test_pg_int8_keeps_integer_and_fp16_tensors_and_reads_an_artifact_without_its_optional_maps():
    sd = {"steps": torch.arange(7), "half": torch.randn(8, 8).half(), "w": torch.randn(300, 256)}
    obj = pg_int8.quantize_state_dict(sd)
    assert obj["passthrough"]["steps"] is not None and torch.equal(obj["passthrough"]["steps"], sd["steps"])
    assert obj["passthrough"]["half"].dtype == torch.float16 and torch.equal(obj["passthrough"]["half"], sd["half"])
    assert "half" not in obj["passthrough_orig_dtypes"]
    assert obj["quantized"]["w"].dtype == torch.int8 and obj["scales"]["w"].dtype == torch.float16
    bare = {k: v for k, v in obj.items() if k not in ("qmeta", "passthrough_orig_dtypes")}  # both are optional
    out, full = pg_int8.dequantize_state_dict(bare), pg_int8.dequantize_state_dict(obj)
    assert set(out) == set(sd) and all(torch.equal(out[k], full[k]) and out[k].dtype == full[k].dtype for k in sd)
    assert out["steps"].dtype == torch.int64 and out["half"].dtype == torch.float16
    with pytest.raises(ValueError) as e:
        pg_int8.dequantize_state_dict({**obj, "__quant_format__": "int6_gptq"})
    assert str(e.value) == "artifact format 'int6_gptq' is not 'int8_clean_per_row_v1'"


def test_pg_int8_packs_at_zlib_level_9_and_unpacks_weights_only():
    import datetime
    import pickle

    obj = pg_int8.quantize_state_dict({"w": torch.randn(300, 256, generator=torch.Generator().manual_seed(2))})
    blob = pg_int8.pack(obj)
    raw = zlib.decompress(blob)
    assert zlib.compress(raw, 9) == blob and zlib.compress(raw) != blob  # level 9, as parameter-golf writes it
    back = pg_int8.unpack(blob)
    assert torch.equal(back["quantized"]["w"], obj["quantized"]["w"])
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "when": datetime.date(2026, 1, 1)}, buf)  # an object only full pickle reads
    with pytest.raises(pickle.UnpicklingError):
        pg_int8.unpack(zlib.compress(buf.getvalue(), 9))


class _PgModule(nn.Module):
    """A bank over the float limit (one scale), a matrix (per-row scales), a control tensor (fp32), a small
    weight (fp16) and an integer buffer: every path of parameter-golf's artifact."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(8)
        self.bank = nn.Parameter(torch.randn(4, 130, 140, generator=g) * 0.001)  # norm 0.27: below 1
        self.proj = nn.Parameter(torch.randn(300, 256, generator=g))
        self.mlp_scale = nn.Parameter(torch.rand(256, generator=g))
        self.small = nn.Parameter(torch.randn(64, 64, generator=g))
        self.register_buffer("steps", torch.arange(5))


def test_the_pg_int8_report_and_weights_by_hand():
    import lzma

    model = _PgModule()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    q, report = quantize_model(model, parse_regime("pg-int8"), QuantConfig())
    bank_q, bank_s = _reference_int8_one_scale(sd["bank"])
    proj_q, proj_s = _reference_int8(sd["proj"])
    want = {"bank": bank_q.float() * float(bank_s), "proj": proj_q.float() * proj_s.float()[:, None],
            "mlp_scale": sd["mlp_scale"], "small": sd["small"].half().float(), "steps": sd["steps"]}
    got = q.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v) and got[k].dtype == sd[k].dtype, k
    assert [t["name"] for t in report.tensors] == ["bank", "proj"] and report.quantized_params == 72_800 + 76_800
    for t in report.tensors:
        assert t["numel"] == sd[t["name"]].numel() and t["bits"] == 8
        assert t["rel_error"] == pytest.approx(float((want[t["name"]] - sd[t["name"]]).norm() / sd[t["name"]].norm()),
                                               rel=1e-6)
    assert 0 < report.tensors[0]["rel_error"] < 0.05  # the bank's clip/127 is taken, not floored at 1/127
    assert set(report.grid) == {"bank", "proj", "small"}  # the fp32 control tensor and the integers are not re-encoded
    assert report.grid["bank"] == {"kind": "scalar", "param": "bank", "scale": float(bank_s)}
    proj = dict(report.grid["proj"])
    np.testing.assert_array_equal(proj.pop("scales"), proj_s.float().numpy())
    assert proj == {"kind": "codes", "param": "proj", "index": None, "transposed": False, "levels": 255,
                    "rotation_seed": -1}
    assert report.grid["small"] == {"kind": "fp16", "param": "small", "index": None, "transposed": False}
    assert report.selection == {"rule": "parameter-golf int8_clean_per_row_v1: float tensors above 65,536 elements"}
    raw = zlib.decompress(pg_int8.pack(pg_int8.quantize_state_dict(sd)))
    assert report.artifact_bytes_zlib == len(zlib.compress(raw, 9))
    assert report.artifact_bytes_lzma == len(lzma.compress(raw, preset=9))


def test_a_power_of_two_width_rotates_by_signed_hadamard_and_any_width_inverts_in_its_own_dtype():
    for n in (1, 8, 64):
        R = Rotation(n, seed=1)
        M = R.apply(torch.eye(n, dtype=torch.float64))
        torch.testing.assert_close(M.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))  # every entry ±1/√n
    M6 = Rotation(6, seed=1).apply(torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(M6 @ M6.T, torch.eye(6, dtype=torch.float64))
    assert M6.abs().std() > 0.05  # not a signed Hadamard matrix (none exists at width 6)
    for n in (8, 6):
        R = Rotation(n, seed=2)
        x = torch.randn(5, n)
        back = R.inverse(R.apply(x))
        assert back.dtype == torch.float32
        torch.testing.assert_close(back, x, rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 1)
    assert torch.equal(fwht(x), x)  # width 1: the transform is the identity
    with pytest.raises(ValueError) as e:
        fwht(torch.zeros(2, 12))
    assert str(e.value) == "fwht needs a power-of-two width, got 12"


def test_a_packed_artifact_reads_back_as_float32_passthrough_and_refuses_another_format():
    art = {"format": "e2ettt_packed_v1", "quantized": {},
           "passthrough": {"a": torch.ones(3, dtype=torch.float16), "n": torch.arange(3)}}
    out = decode(art)
    assert out["a"].dtype == torch.float32 and out["n"].dtype == torch.int64 and torch.equal(out["n"], torch.arange(3))
    with pytest.raises(ValueError) as e:
        decode({**art, "format": "int8_clean_per_row_v1"})
    assert str(e.value) == "artifact format 'int8_clean_per_row_v1' is not 'e2ettt_packed_v1'"


# (setting, a value refused, the message word for word, the values at the edge that are accepted)
QUANT_REFUSED = [
    ("grid", "asym", "quant.grid must be one of symmetric, midrise, got 'asym'", ["symmetric", "midrise"]),
    ("clip_q", 0.5, "quant.clip_q must be in (0.5, 1], got 0.5", [0.5000001, 1.0]),
    ("clip_q", 1.0001, "quant.clip_q must be in (0.5, 1], got 1.0001", []),
    ("embed_bits", 1, "quant.embed_bits must be 0 or 2..8, got 1", [0, 2, 8]),
    ("embed_bits", 9, "quant.embed_bits must be 0 or 2..8, got 9", []),
    ("calib_tokens", 255, "quant.calib_tokens=255 is less than one sequence of 256", [256]),
    ("min_share", -0.01, "quant.min_share must be in [0, 1], got -0.01", [0.0, 1.0]),
    ("min_share", 1.01, "quant.min_share must be in [0, 1], got 1.01", []),
    ("linear_types", " ", "quant.linear_types must name at least one module class, e.g. torch.nn.Linear",
     ["torch.nn.Linear"]),
]


@pytest.mark.parametrize("setting, bad, message, edges", QUANT_REFUSED, ids=[f"{r[0]}={r[1]}" for r in QUANT_REFUSED])
def test_each_quant_setting_is_refused_past_its_edge_with_its_own_message_and_accepted_at_it(setting, bad, message,
                                                                                               edges):
    with pytest.raises(ValueError) as err:
        QuantConfig(**{setting: bad}).validate()
    assert str(err.value) == message
    for ok in edges:
        QuantConfig(**{setting: ok}).validate()


def test_calibration_takes_whole_sequences_down_to_one_and_refuses_less():
    from e2ettt.quant.apply import _calibration_batches

    cfg = QuantConfig(calib_tokens=600, calib_seq_len=256)
    assert torch.equal(_calibration_batches(torch.arange(1000), cfg), torch.arange(512).view(2, 256))  # the budget's 2
    assert torch.equal(_calibration_batches(torch.arange(300), cfg), torch.arange(256).view(1, 256))  # the stream's 1
    with pytest.raises(ValueError) as e:
        _calibration_batches(torch.arange(255), cfg)
    assert str(e.value) == "calibration stream of 255 tokens is shorter than one sequence of 256"


def test_rotations_are_drawn_from_their_seed():
    for n in (8, 6):  # signed Hadamard and random orthogonal
        eye = torch.eye(n, dtype=torch.float64)
        a, b, c = (Rotation(n, seed=s).apply(eye) for s in (5, 5, 6))
        assert torch.equal(a, b) and not torch.equal(a, c)
        torch.manual_seed(0)
        d = Rotation(n, seed=5).apply(eye)
        torch.manual_seed(1)
        assert torch.equal(d, Rotation(n, seed=5).apply(eye))  # the global generator plays no part


# regime -> (method, bits, rotate, ternary, decode, share, noise, family, draws, strength, levels symmetric, midrise)
REGIMES = {
    "fp": ("fp", 32, False, False, "right", 1.0, 0.0, "control", False, 1.0, 2**32 - 1, 2**32),
    "pg-int8": ("pg", 8, False, False, "right", 1.0, 0.0, "pg-int8", False, 1.0, 255, 256),
    "mine": ("own", 0, False, False, "right", 1.0, 0.0, "own", False, 1.0, 0, 1),
    " int2 ": ("rtn", 2, False, False, "right", 1.0, 0.0, "rtn", False, 1.0, 3, 4),
    "int8": ("rtn", 8, False, False, "right", 1.0, 0.0, "rtn", False, 1.0, 255, 256),
    "gptq-int4": ("gptq", 4, False, False, "right", 1.0, 0.0, "gptq", False, 1.0, 15, 16),
    "hadamard-int6": ("rtn", 6, True, False, "right", 1.0, 0.0, "hadamard-rtn", False, 1.0, 63, 64),
    "hadamard-gptq-ternary": ("gptq", 2, True, True, "right", 1.0, 0.0, "hadamard-gptq", False, 1.0, 3, 3),
    "int3-.5": ("rtn", 3, False, False, "right", 0.5, 0.0, "rtn", True, 0.5, 7, 8),
    "int3-1": ("rtn", 3, False, False, "right", 1.0, 0.0, "rtn", False, 1.0, 7, 8),
    "hadamard-int4-unrotated": ("rtn", 4, True, False, "unrotated", 1.0, 0.0, "structured", True, 1.0, 15, 16),
    "hadamard-gptq-int6-mismatch-0.25": ("gptq", 6, True, False, "mismatch", 0.25, 0.0, "structured", True, 0.25, 63,
                                         64),
    "noise-10": ("noise", 16, False, False, "right", 1.0, 10.0, "unstructured", True, 10.0, 2**16 - 1, 2**16),
    "noise-0.05": ("noise", 16, False, False, "right", 1.0, 0.05, "unstructured", True, 0.05, 2**16 - 1, 2**16),
}


@pytest.mark.parametrize("name", list(REGIMES))
def test_every_regime_form_parses_to_its_settings_family_and_grid(name):
    r = parse_regime(name, own={"mine"})
    want = REGIMES[name]
    assert r.name == name.strip()
    assert (r.method, r.bits, r.rotate, r.ternary, r.decode, r.share, r.noise) == want[:7]
    assert (r.family, r.draws, r.strength, r.levels("symmetric"), r.levels("midrise")) == want[7:]
    assert r.levels() == want[10] and r.needs_calibration == (r.method == "gptq")


VALID_FORMS = ("fp, pg-int8, intN, gptq-intN, hadamard-intN, hadamard-gptq-intN (N = 2..8; ternary in place of intN), "
               "each with an optional share -S (0 < S < 1); hadamard-[gptq-]intN-mismatch[-S] and -unrotated[-S]; "
               "noise-X (0 < X <= 10); the NAME of an --artifact NAME=PATH")


@pytest.mark.parametrize("name, message", [
    ("int9", None), ("int1", None), ("mine", None),  # "mine" names no artifact here
    ("noise-10.5", "regime 'noise-10.5': the noise size must be in (0, 10], got 10.5"),
    ("noise-0", "regime 'noise-0': the noise size must be in (0, 10], got 0"),
    ("int4-0", "regime 'int4-0': the share must be in (0, 1], got 0"),
    ("int4-1.01", "regime 'int4-1.01': the share must be in (0, 1], got 1.01"),
    ("gptq-int4-mismatch", "regime 'gptq-int4-mismatch': -mismatch decodes rotated weights wrongly, so it needs "
                           "hadamard-"),
    ("int4-unrotated-0.5", "regime 'int4-unrotated-0.5': -unrotated decodes rotated weights wrongly, so it needs "
                           "hadamard-"),
])
def test_each_bad_regime_is_refused_with_its_own_message(name, message):
    with pytest.raises(RegimeError) as e:
        parse_regime(name)
    assert str(e.value) == (message or f"unknown quantization regime {name!r}; valid forms: {VALID_FORMS}")


@pytest.mark.parametrize("levels, clip_q", [(15, 1.0), (16, 1.0), (7, 0.75), (3, 1.0)])
def test_rtn_by_hand_clip_scale_codes_and_a_zero_row(levels, clip_q):
    """s = clip/c in fp16 (clip the row's max, or its clip_q quantile of |w|), u = clamp(round(w/s + c), 0, n-1),
    Q = (u - c)·s; a row of zeros gets the smallest fp16 scale and decodes to its levels nearest zero (0 on a grid
    with a zero, ±2^-25 on a midrise one)."""
    g = torch.Generator().manual_seed(levels)
    W = torch.randn(5, 40, generator=g)
    W[2] = 0
    c = (levels - 1) / 2
    clip = W.abs().amax(dim=1) if clip_q == 1.0 else torch.quantile(W.abs(), clip_q, dim=1)
    s = torch.where(clip > 0, clip / c, torch.full_like(clip, 2.0**-24)).half().float()
    u = torch.clamp(torch.round(W / s[:, None] + c), 0, levels - 1)
    q = rtn(W, levels, clip_q)
    assert torch.equal(q.scales, s) and float(q.scales[2]) == 2.0**-24
    assert torch.equal(q.codes, u.to(torch.uint8)) and q.codes.dtype == torch.uint8
    assert torch.equal(q.Q, (u - c) * s[:, None]) and q.Q.dtype == torch.float32
    assert float(q.Q[2].abs().max()) == (0.0 if levels % 2 else 2.0**-25)
    if clip_q < 1:  # entries past the clip take the end codes
        assert int(q.codes.max()) == levels - 1 and int(q.codes.min()) == 0


def test_an_artifact_entry_by_hand_and_its_sizes():
    """entry() stores packed codes, fp16 scales, bits, levels, shape and the rotation seed (-1: none); decode_entry
    reads back (u - c)·s, un-rotated by the seed's rotation when there is one (seed 0 included)."""
    import lzma

    from e2ettt.quant.artifact import compressed_sizes, decode_entry, entry

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 15, (4, 8), generator=g).to(torch.uint8)
    scales = torch.rand(4, generator=g).half().float()
    plain = entry(codes, scales, 4, 15, None)
    assert plain["bits"] == 4 and plain["levels"] == 15 and plain["shape"] == [4, 8] and plain["rotation_seed"] == -1
    assert plain["scales"].dtype == torch.float16 and torch.equal(plain["scales"].float(), scales)
    assert plain["codes"].dtype == torch.uint8 and bytes(plain["codes"].numpy()) == pack_codes(codes, 4)
    W = (codes.float() - 7) * scales[:, None]
    assert torch.equal(decode_entry(plain), W)
    for seed in (0, 5):
        rotated = entry(codes, scales, 4, 15, seed)
        assert rotated["rotation_seed"] == seed
        torch.testing.assert_close(decode_entry(rotated), Rotation(8, seed).inverse(W.double()).float(), rtol=0, atol=0)
        assert not torch.allclose(decode_entry(rotated), W)
    obj = {"w": torch.randn(200, 100, generator=g), "n": torch.arange(10)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    assert compressed_sizes(obj) == {"raw": len(raw), "zlib": len(zlib.compress(raw, 9)),
                                     "lzma": len(lzma.compress(raw, preset=9))}
    assert len(zlib.compress(raw)) != len(zlib.compress(raw, 9))  # the size tells zlib's default level from 9


def test_the_lzma_size_is_preset_9s_whose_window_reaches_back_past_8_mib():
    """A 16 MB record's artifact is larger than lzma's default 8 MiB window: a block repeated 9.5 MiB later is found
    by preset 9 (64 MiB window) only, and the headline size is preset 9's."""
    import lzma

    from e2ettt.quant.artifact import compressed_sizes

    g = torch.Generator().manual_seed(0)
    block = torch.randint(0, 256, (1 << 20,), generator=g, dtype=torch.uint8)
    period = torch.randint(0, 256, (1 << 16,), generator=g, dtype=torch.uint8)
    obj = {"w": torch.cat([block, period.repeat(136), block])}
    size = compressed_sizes(obj)["lzma"]
    buf = io.BytesIO()
    torch.save(obj, buf)
    assert size == len(lzma.compress(buf.getvalue(), preset=9)) < 0.6 * len(lzma.compress(buf.getvalue()))


def _reference_gptq(W: Tensor, H: Tensor, levels: int, damp: float, act_order: bool) -> Tensor:
    """GPTQ's codes as Algorithm 1 states it, in float64 without lazy batches or Cholesky factors: quantize one
    column at a time (by decreasing diag(H) with act order), spread its error over the columns not yet quantized
    through the inverse Hessian, and remove the column from that inverse. A dead input (diag(H) = 0) gets weight 0."""
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    c = (levels - 1) / 2
    s = (W.abs().amax(dim=1) / c).clamp_min(2.0**-24).half().double()
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    Hinv = torch.linalg.inv(H + damp * torch.diag(H).mean() * torch.eye(W.shape[1], dtype=torch.float64))
    codes, done = torch.zeros_like(W), torch.zeros(W.shape[1], dtype=torch.bool)
    for j in order.tolist():
        u = torch.clamp(torch.round(W[:, j] / s + c), 0, levels - 1)
        codes[:, j] = u
        err = (W[:, j] - (u - c) * s) / Hinv[j, j]
        done[j] = True
        W[:, ~done] -= err[:, None] * Hinv[j, ~done][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes


@pytest.mark.parametrize("levels, block, damp, act_order, size", [
    (15, 16, 0.01, True, 1.0), (7, 48, 0.1, False, 1.0), (3, 5, 0.01, True, 1.0), (16, 128, 0.05, True, 1.0),
    (15, None, 0.3, False, 0.05),  # small inputs: the dead input's stand-in diagonal of 1 weighs in the damping
    (15, None, None, None, 1.0)])  # gptq's defaults: lazy batches of 128, damping 0.01, act order
def test_gptq_gives_the_codes_of_algorithm_1_written_plainly(levels, block, damp, act_order, size):
    """Lazy batches of any width (a partial last one included), act order or not, damping, a dead input: the same
    codes as the plain algorithm, the row scales of RTN, and W and H left as they were."""
    g = torch.Generator().manual_seed(0)
    X = size * torch.randn(2048, 48, generator=g) @ torch.randn(48, 48, generator=g)
    X[:, 5] = 0  # an input that is always zero
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(24, 48, generator=g)
    W0, H0 = W.clone(), H.clone()
    given = {k: v for k, v in (("block", block), ("damp", damp), ("act_order", act_order)) if v is not None}
    q = gptq(W, H, levels, **given)
    want = _reference_gptq(W, H, levels, 0.01 if damp is None else damp, True if act_order is None else act_order)
    assert q.codes.dtype == torch.uint8 and torch.equal(q.codes, want.to(torch.uint8))
    c = (levels - 1) / 2
    s = (torch.where(torch.arange(48) == 5, 0.0, W).abs().amax(dim=1) / c).half().float()
    assert torch.equal(q.scales, s) and torch.equal(q.Q, (q.codes.float() - c) * s[:, None])
    assert torch.equal(W, W0) and torch.equal(H, H0)
    live = torch.where(torch.arange(48) == 5, 0.0, W)
    assert torch.equal(gptq(W, H, levels, clip_q=0.9).scales, rtn(live, levels, 0.9).scales)  # RTN's clipped scales


class _Small(nn.Module):
    """An embedding and two linear weights above the float limit (76,800 elements each), one below it, a control
    tensor and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 256)
        self.fc = nn.Linear(256, 300, bias=False)
        self.proj = nn.Linear(300, 256, bias=False)
        self.tiny = nn.Linear(8, 8, bias=False)
        self.attn_scale = nn.Parameter(torch.ones(256))
        self.register_buffer("steps", torch.arange(4))
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, ids):
        return self.proj(torch.relu(self.fc(self.emb(ids) * self.attn_scale)))


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("grid", ["symmetric", "midrise"])
def test_an_rtn_regime_stores_and_reports_each_weight_by_hand(grid):
    """int4: the two linear weights on the grid's 4-bit levels, the embedding at embed_bits=8, each by RTN; the small
    weight stored fp16, the control tensor fp32, the integers as they are; report, selection and grid by hand."""
    model = _Small()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig(grid=grid)
    q, report = quantize_model(model, parse_regime("int4"), cfg)
    levels = {"emb.weight": 255 if grid == "symmetric" else 256, "fc.weight": 15 if grid == "symmetric" else 16}
    levels["proj.weight"] = levels["fc.weight"]
    got = q.state_dict()
    for name, n in levels.items():
        want = rtn(sd[name], n).Q
        assert torch.equal(got[name], want), name
    assert torch.equal(got["tiny.weight"], sd["tiny.weight"].half().float())
    assert torch.equal(got["attn_scale"], sd["attn_scale"]) and torch.equal(got["steps"], sd["steps"])
    assert report.tensors == [
        {"name": name, "uses": [name.split(".")[0]], "shared": False, "numel": 76_800, "bits": 8 if name == "emb.weight"
         else 4, "levels": n, "decode": "right", "rel_error": pytest.approx(_rel(rtn(sd[name], n).Q, sd[name]), rel=1e-6)}
        for name, n in levels.items()]
    assert report.quantized_params == 3 * 76_800 and report.notes == []
    assert report.selection == {"linear_types": "torch.nn.Linear", "keep_float": cfg.keep_float, "min_numel": 65_536,
                                "embed_bits": 8, "grid": grid, "share": 1.0,
                                "treated": ["fc.weight", "proj.weight"], "matrix_parameters": 3 * 76_800,
                                "reached": 3 * 76_800, "outside_modules": []}
    stored = report.artifact
    assert stored["format"] == "e2ettt_packed_v1" and set(stored["quantized"]) == set(levels)
    assert {k: (v.dtype, v.shape) for k, v in stored["passthrough"].items()} == {
        "tiny.weight": (torch.float16, (8, 8)), "attn_scale": (torch.float32, (256,)), "steps": (torch.int64, (4,))}
    for name, n in levels.items():
        g = dict(report.grid[name])
        np.testing.assert_array_equal(g.pop("scales"), rtn(sd[name], n).scales.numpy())
        assert g == {"kind": "codes", "param": name, "index": None, "transposed": False, "levels": n,
                     "rotation_seed": -1}
    assert report.grid["tiny.weight"] == {"kind": "fp16", "param": "tiny.weight", "index": None, "transposed": False}
    assert set(report.grid) == set(levels) | {"tiny.weight"}


def test_a_share_treats_a_seeded_half_of_the_linear_weights_and_keeps_the_rest_in_fp16():
    model = _Small()
    with torch.no_grad():
        for w in (model.fc.weight, model.proj.weight):
            w.mul_(1e-3)  # norms about 0.28: an error is relative to the weight's own norm, below 1 too
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    treated = []
    for seed in range(6):
        q, report = quantize_model(model, parse_regime("int4-0.5"), QuantConfig(rotation_seed=seed))
        (name,) = report.selection["treated"]  # round(0.5 · 2) = 1 of the two linear weights
        other = ({"fc.weight", "proj.weight"} - {name}).pop()
        got = q.state_dict()
        assert torch.equal(got[name], rtn(sd[name], 15).Q) and torch.equal(got[other], sd[other].half().float())
        assert torch.equal(got["emb.weight"], rtn(sd["emb.weight"], 255).Q)  # the embedding is not in the draw
        assert set(report.artifact["passthrough"]) == {other, "tiny.weight", "attn_scale", "steps"}
        kept = next(t for t in report.tensors if t["name"] == other)
        assert kept == {"name": other, "uses": [other.removesuffix(".weight")], "numel": 76_800, "bits": 16,
                        "rel_error": pytest.approx(_rel(sd[other].half().float(), sd[other]))}
        quantized = next(t for t in report.tensors if t["name"] == name)
        assert quantized["rel_error"] == pytest.approx(_rel(rtn(sd[name], 15).Q, sd[name]))
        assert report.quantized_params == 2 * 76_800 and report.grid[other]["kind"] == "fp16"
        treated.append(name)
    assert set(treated) == {"fc.weight", "proj.weight"}  # the seed decides which


def test_a_share_draws_round_share_n_weights_by_name_from_its_seed_alone():
    """treated_share: of the linear weights (embedding tables only when asked), sorted by name, the first
    max(1, round(share · n)) of torch.randperm(n) seeded by the rotation seed; the global generator plays no part."""
    names = ["w4", "w3", "w2", "w1", "w0"]  # keys 0..4 in the opposite order to their names
    targets = {k: Target(name=n, param=nn.Parameter(torch.zeros(2, 2))) for k, n in enumerate(names)}
    targets[5] = Target(name="a_emb", param=nn.Parameter(torch.zeros(2, 2)), embeddings=["a_emb"])

    def by_hand(share, seed, keys):
        keys = sorted(keys, key=lambda k: targets[k].name)
        order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
        return {keys[i] for i in order[: max(1, round(share * len(keys)))]}

    linear = [0, 1, 2, 3, 4]
    for seed in range(4):
        torch.manual_seed(100 + seed)  # the global generator's state differs on every call
        half = treated_share(targets, 0.5, seed)
        assert half == by_hand(0.5, seed, linear) and len(half) == 2  # round(2.5) = 2
        tiny = treated_share(targets, 0.01, seed)
        assert tiny == by_hand(0.01, seed, linear) and len(tiny) == 1  # round(0.05) = 0: at least one
        assert treated_share(targets, 0.5, seed, embeddings=True) == by_hand(0.5, seed, [*linear, 5])
    assert len({frozenset(treated_share(targets, 0.5, seed)) for seed in range(4)}) > 1  # the seed decides
    assert treated_share(targets, 1.0, 3) == set(linear)
    assert treated_share(targets, 1.0, 3, embeddings=True) == set(range(6))


def test_noise_adds_seeded_noise_of_x_times_each_rows_rms_to_every_weight_it_treats():
    """noise-0.5: each weight (the embedding too) gets 0.5 · its row's RMS times a standard normal draw seeded by
    rotation_seed · 1,000,003 + crc32(name), stored in fp16."""
    model = _Small()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    q, report = quantize_model(model, parse_regime("noise-0.5"), QuantConfig(rotation_seed=2))
    got = q.state_dict()
    for name in ("emb.weight", "fc.weight", "proj.weight"):
        W = sd[name]
        g = torch.Generator().manual_seed(2 * 1_000_003 + zlib.crc32(name.encode()))
        noised = W + 0.5 * W.square().mean(dim=1, keepdim=True).sqrt() * torch.randn(W.shape, generator=g)
        assert torch.equal(got[name], noised.half().float()), name
    assert report.selection["treated"] == ["emb.weight", "fc.weight", "proj.weight"] and report.quantized_params == 0


@pytest.mark.parametrize("clip_q, act_order", [(1.0, True), (0.9, False)])
def test_gptq_calibrates_each_layer_on_the_inputs_the_layers_quantized_before_it_give(clip_q, act_order):
    """gptq-int4 on the small model: the embedding first (RTN at 8 bits), then fc with H = 2XᵀX/n of the quantized
    embedding's output, then proj with H of relu(fc's quantized output): whole sequences of the calibration stream,
    at most calib_tokens of it, with the config's clip and order. Proxy losses by hand."""
    model = _Small()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig(calib_tokens=600, calib_seq_len=128, clip_q=clip_q, act_order=act_order)
    calib = torch.randint(0, 300, (1000,), generator=torch.Generator().manual_seed(1))
    q, report = quantize_model(model, parse_regime("gptq-int4"), cfg, calib)
    ids = calib[:512].view(4, 128)  # four whole sequences fit in 600 tokens

    def hessian(x):
        x = x.reshape(-1, x.shape[-1]).double()
        return (2.0 * (x.T @ x) / x.shape[0]).float()

    emb = rtn(sd["emb.weight"], 255, clip_q).Q
    x_fc = F.embedding(ids, emb) * sd["attn_scale"]
    H_fc = hessian(x_fc)
    fc = gptq(sd["fc.weight"], H_fc, 15, cfg.gptq_block, cfg.gptq_damp, act_order, clip_q)
    H_proj = hessian(torch.relu(F.linear(x_fc, fc.Q)))
    proj = gptq(sd["proj.weight"], H_proj, 15, cfg.gptq_block, cfg.gptq_damp, act_order, clip_q)
    got = q.state_dict()
    assert torch.equal(got["emb.weight"], emb)
    assert torch.equal(got["fc.weight"], fc.Q) and torch.equal(got["proj.weight"], proj.Q)
    stats = {t["name"]: t for t in report.tensors}
    assert "proxy_loss" not in stats["emb.weight"]  # looked up, not multiplied: no Hessian
    for name, H, Q in (("fc.weight", H_fc, fc.Q), ("proj.weight", H_proj, proj.Q)):
        assert stats[name]["proxy_loss"] == pytest.approx(proxy_loss(sd[name], Q, H), rel=1e-9)
        assert stats[name]["rtn_proxy_loss"] == pytest.approx(proxy_loss(sd[name], rtn(sd[name], 15, clip_q).Q, H),
                                                              rel=1e-9)
    assert report.notes == []
    with pytest.raises(ValueError) as e:
        quantize_model(model, parse_regime("gptq-int4"), cfg)
    assert str(e.value) == "regime gptq-int4 needs calibration tokens from the train split"


@pytest.mark.parametrize("regime", ["hadamard-int4", "hadamard-int4-mismatch", "hadamard-int4-unrotated",
                                    "hadamard-int4-mismatch-0.5"])
def test_rotated_and_wrongly_decoded_weights_by_hand(regime):
    """hadamard-int4: W R quantized by RTN, stored with the weight's seed (rotation_seed · 1,000,003 + crc32(name)),
    decoded as Q Rᵀ; -mismatch decodes with Rotation(seed + 1), -unrotated not at all, each for the weights it draws
    (the embedding too: it is rotated like the rest); the note counts them."""
    model = _Small()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    q, report = quantize_model(model, parse_regime(regime), QuantConfig())
    r = parse_regime(regime)
    treated = report.selection["treated"]
    # a right decode treats the linear weights (the embedding is quantized anyway); a wrong one draws from all three,
    # round(0.5 · 3) = 2 of them at share 0.5
    assert len(treated) == (2 if r.decode == "right" or r.share < 1 else 3)
    got, entries = q.state_dict(), report.artifact["quantized"]
    for name, levels in (("emb.weight", 255), ("fc.weight", 15), ("proj.weight", 15)):
        W, seed = sd[name], zlib.crc32(name.encode())
        codes = rtn(Rotation(W.shape[1], seed).apply(W.double()).float(), levels)
        wrong = r.decode != "right" and name in treated
        stored = {"mismatch": seed + 1, "unrotated": -1}[r.decode] if wrong else seed
        want = codes.Q if stored < 0 else Rotation(W.shape[1], stored).inverse(codes.Q.double()).float()
        assert torch.equal(got[name], want), name
        assert entries[name]["rotation_seed"] == stored and report.grid[name]["rotation_seed"] == stored
        stats = next(t for t in report.tensors if t["name"] == name)
        assert stats["decode"] == (stored if wrong else "right")
        assert stats["rel_error"] == pytest.approx(_rel(want, W), rel=1e-5)
    how = {"mismatch": "with another rotation", "unrotated": "without the inverse rotation"}.get(r.decode)
    assert report.notes == ([f"{len(treated)} of 3 quantized weights decoded {how}"] if how else [])


@pytest.mark.parametrize("regime", ["pg-int8", "int4", "hadamard-int4"])
def test_requantization_puts_moved_weights_back_on_the_stored_grid_by_hand(regime):
    """After TTT moves the weights, each stored tensor is re-encoded with its stored scales and rotation: a one-scale
    tensor as round(w/s) clamped to ±127, times s; codes as (clamp(round(w R / s + c), 0, n-1) - c)·s Rᵀ; fp16 as
    fp16. Weights left where they were come back unchanged."""
    from e2ettt.quant.apply import requantize_

    model = _PgModule() if regime == "pg-int8" else _Small()
    q, report = quantize_model(model, parse_regime(regime), QuantConfig())
    stored = {k: v.clone() for k, v in q.state_dict().items()}
    requantize_(q, report.grid)
    assert all(torch.equal(q.state_dict()[k], v) for k, v in stored.items())  # already on the grid
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.abs().mean() * 0.3)
    moved = {k: v.clone() for k, v in q.state_dict().items()}
    requantize_(q, report.grid)
    got = q.state_dict()
    for name, grid in report.grid.items():
        W = moved[name]
        if grid["kind"] == "scalar":
            want = torch.clamp(torch.round(W / grid["scale"]), -127, 127) * grid["scale"]
        elif grid["kind"] == "fp16":
            want = W.half().float()
        else:
            s, n, seed = torch.as_tensor(grid["scales"]), grid["levels"], grid["rotation_seed"]
            Wr = Rotation(W.shape[1], seed).apply(W.double()).float() if seed >= 0 else W
            c = (n - 1) / 2
            Q = (torch.clamp(torch.round(Wr / s[:, None] + c), 0, n - 1) - c) * s[:, None]
            want = Rotation(W.shape[1], seed).inverse(Q.double()).float() if seed >= 0 else Q
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(got[name], moved[name]), name  # the test moved it off the grid
    kinds = {g["kind"] for g in report.grid.values()}
    assert kinds == ({"scalar", "codes", "fp16"} if regime == "pg-int8" else {"codes", "fp16"})
    untouched = set(moved) - set(report.grid)  # control tensors and integers: not re-encoded
    assert untouched and all(torch.equal(got[k], moved[k]) for k in untouched)


def test_linear_types_name_module_classes_or_are_refused_with_one_line():
    from e2ettt.quant.apply import QuantSelectionError, module_classes

    assert module_classes("torch.nn.Linear, ,torch.nn.Embedding") == (nn.Linear, nn.Embedding)
    for spec, why in (("torch.nn.Nope", "cannot import 'torch.nn.Nope'"), ("no_such_pkg.X", "cannot import 'no_such_pkg.X'"),
                      ("Linear", "cannot import 'Linear'"), ("math.pi", "'math.pi' is not an nn.Module class"),
                      ("torch.Tensor", "'torch.Tensor' is not an nn.Module class")):
        with pytest.raises(QuantSelectionError) as e:
            module_classes(spec)
        assert str(e.value) == f"quant.linear_types: {why}"


class _Unused(_Small):
    """_Small with a matrix parameter no forward pass uses, and fc tied to the embedding table."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.randn(300, 256))
        self.fc.weight = self.emb.weight


def test_selection_by_size_name_and_kind_and_the_share_it_must_reach():
    from e2ettt.quant.apply import QuantSelectionError, matrix_parameters, require_targets, select_targets

    model = _Small()
    assert set(select_targets(model, QuantConfig(min_numel=76_799))) == {"emb.weight", "fc.weight", "proj.weight"}
    assert select_targets(model, QuantConfig(min_numel=76_800)) == {}  # more elements than min_numel, not as many
    with pytest.raises(QuantSelectionError) as e:
        require_targets(model, QuantConfig(min_numel=76_800), "int4")
    assert str(e.value) == ("regime int4: _Small has no weight to quantize (no torch.nn.Linear or nn.Embedding weight "
                            "above quant.min_numel=76,800 elements outside quant.keep_float, and no matrix the forward "
                            "pass multiplies)")
    kept = QuantConfig(keep_float="attn_scale, fc", embed_bits=0)
    assert set(select_targets(model, kept)) == {"proj.weight"}
    assert matrix_parameters(model, kept) == {"proj.weight": 76_800}
    packed = QuantConfig(keep_float="attn_scale,fc", embed_bits=0)  # no space after the comma
    assert set(select_targets(model, packed)) == {"proj.weight"} and set(matrix_parameters(model, packed)) == {"proj.weight"}
    assert matrix_parameters(model, QuantConfig()) == {"emb.weight": 76_800, "fc.weight": 76_800, "proj.weight": 76_800}

    tied = _Unused()
    targets = select_targets(tied, QuantConfig())
    assert set(targets) == {"emb.weight", "proj.weight"}  # the tied table once; the unused matrix is found by nobody
    assert targets["emb.weight"].uses == ["fc", "emb"] and targets["emb.weight"].multiplied
    with pytest.raises(QuantSelectionError) as e:
        require_targets(tied, QuantConfig(), "int4")
    assert str(e.value) == ("regime int4: reaches 67% of _Unused's 230,400 matrix parameters (quant.min_share=0.9); "
                            "not reached: unused (76,800): no linear module, embedding or F.linear/matmul in a forward "
                            "pass uses them; set quant.min_share to accept that share")
    assert set(require_targets(tied, QuantConfig(min_share=2 / 3), "int4")) == {"emb.weight", "proj.weight"}


class _Notes(nn.Module):
    """A table tied to a linear layer, a linear layer the forward pass never calls, and a bare matrix it multiplies."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 256)
        self.fc = nn.Linear(256, 300, bias=False)
        self.fc.weight = self.emb.weight
        self.proj = nn.Linear(300, 256, bias=False)
        self.bare = nn.Parameter(torch.randn(256, 300, generator=torch.Generator().manual_seed(4)))

    def forward(self, ids):
        return F.linear(torch.relu(self.fc(self.emb(ids))), self.bare)


def test_the_report_notes_what_a_user_should_know_about_the_selection():
    calib = torch.randint(0, 300, (600,), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(calib_tokens=512, calib_seq_len=128)
    q, report = quantize_model(_Notes(), parse_regime("gptq-int4"), cfg, calib)
    assert report.notes == [
        "never called in the forward pass, so quantized by RTN: ['proj.weight']",
        "shared weights quantized once, Hessian summed over every use: ['emb.weight (used by fc, emb)']",
        "1 matrices no linear module holds (bare parameters or bank slices), found by tracing a forward pass"]
    assert report.selection["outside_modules"] == ["bare"] and report.selection["reached"] == 3 * 76_800
    shared = {t["name"]: t["shared"] for t in report.tensors}
    assert shared == {"emb.weight": True, "proj.weight": False, "bare": False}  # the table: two uses
    half = _Notes().to(torch.bfloat16)
    q, report = quantize_model(half, parse_regime("int4"), cfg)
    assert report.notes[-1] == ("the model's own dtypes kept: decoded weights are cast into them as the records load "
                                "them")
    assert all(p.dtype == torch.bfloat16 for p in q.parameters())


def test_ternary_keeps_its_three_levels_on_the_midrise_grid():
    q, report = quantize_model(_Small(), parse_regime("ternary"), QuantConfig(grid="midrise"))
    fc = next(t for t in report.tensors if t["name"] == "fc.weight")
    assert fc["levels"] == 3 and report.grid["fc.weight"]["levels"] == 3
    assert q.fc.weight.unique(dim=None).numel() <= 3 * 300  # three values per row
    emb = next(t for t in report.tensors if t["name"] == "emb.weight")
    assert emb["levels"] == 2**8  # the table at embed_bits, on the midrise grid


def test_a_noise_regime_with_a_share_noises_its_draw_and_keeps_the_rest_in_fp16():
    import dataclasses

    model = _Small()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    regime = dataclasses.replace(parse_regime("noise-0.5"), share=0.5)
    q, report = quantize_model(model, regime, QuantConfig(rotation_seed=1))
    treated = set(report.selection["treated"])
    assert len(treated) == 2  # round(0.5 · 3): the embedding is in the draw for noise
    for name in ("emb.weight", "fc.weight", "proj.weight"):
        got = q.state_dict()[name]
        assert torch.equal(got, sd[name].half().float()) is (name not in treated), name


class _Autocast(_Notes):
    """_Notes recording whether each forward pass runs under autocast, and in which dtype (in the class: quantize_model
    runs a copy)."""

    seen: list = []

    def forward(self, ids):
        type(self).seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return super().forward(ids)


def test_gptqs_calibration_passes_run_under_the_trials_autocast_dtype():
    calib = torch.randint(0, 300, (600,), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(calib_tokens=512, calib_seq_len=128)
    _Autocast.seen.clear()
    quantize_model(_Autocast(), parse_regime("gptq-int4"), cfg, calib, autocast_dtype=torch.bfloat16)
    traced, calibrating = _Autocast.seen[0], _Autocast.seen[1:]
    assert traced is None and len(calibrating) >= 3  # the selection's trace, then the grouping and each group's pass
    assert set(calibrating) == {torch.bfloat16}


class _Bank(nn.Module):
    """Matrices no module holds: a bare table looked up with F.embedding, a bank of two (out, in) slices applied
    with F.linear (the second twice), an (in, out) matrix applied as x @ W, and a bare matrix of exactly 60,000
    elements."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.table = nn.Parameter(torch.randn(300, 300, generator=g))
        self.bank = nn.Parameter(torch.randn(2, 300, 300, generator=g) * 0.05)
        self.up = nn.Parameter(torch.randn(300, 400, generator=g) * 0.05)  # (in, out)
        self.edge = nn.Parameter(torch.randn(150, 400, generator=g) * 0.05)

    def forward(self, ids):
        x = F.linear(F.embedding(ids, self.table), self.bank[0])
        x = F.linear(torch.relu(F.linear(x, self.bank[1])), self.bank[1])
        return F.linear(x @ self.up, self.edge)


def test_matrices_no_module_holds_are_selected_stored_and_reported_where_they_live():
    model = _Bank()
    cfg = QuantConfig(min_numel=60_000)
    q, report = quantize_model(model, parse_regime("int4"), cfg)
    codes = {k: {f: g[f] for f in ("kind", "param", "index", "transposed")} for k, g in report.grid.items()}
    assert codes == {"table": {"kind": "codes", "param": "table", "index": None, "transposed": False},
                     "bank.0": {"kind": "codes", "param": "bank", "index": 0, "transposed": False},
                     "bank.1": {"kind": "codes", "param": "bank", "index": 1, "transposed": False},
                     "up": {"kind": "codes", "param": "up", "index": None, "transposed": True},
                     "edge": {"kind": "fp16", "param": "edge", "index": None, "transposed": False}}
    assert report.artifact["passthrough"]["edge"].dtype == torch.float16  # 60,000 elements: not above min_numel
    levels = {k: g["levels"] for k, g in report.grid.items() if g["kind"] == "codes"}
    assert levels == {"table": 255, "bank.0": 15, "bank.1": 15, "up": 15}  # the bare table at embed_bits
    assert report.notes == [
        "shared weights quantized once, Hessian summed over every use: ['bank.1 (used by linear in the forward pass "
        "(2x))']",
        "4 matrices no linear module holds (bare parameters or bank slices), found by tracing a forward pass"]
    uses = {t["name"]: t["uses"] for t in report.tensors if t["bits"] < 16}
    assert uses == {"table": ["embedding in the forward pass (1x)"], "bank.0": ["linear in the forward pass (1x)"],
                    "bank.1": ["linear in the forward pass (2x)"], "up": ["matmul in the forward pass (1x)"]}
    torch.testing.assert_close(q.up.T, rtn(model.up.T, 15).Q, rtol=0, atol=0)  # quantized as (out, in) rows
    sizes = artifact_sizes(report.artifact)
    assert (report.artifact_bytes_zlib, report.artifact_bytes_lzma) == (sizes["zlib"], sizes["lzma"])
    assert report.artifact_bytes_zlib > (2 * 90_000 + 120_000 + 90_000) * 4 // 8  # random 4-bit codes barely shrink
    no_tables = select_targets(model, QuantConfig(min_numel=60_000, embed_bits=0))
    assert set(no_tables) == {"bank.0", "bank.1", "up"}  # without embed_bits the bare table stays float, not the rest


class _Custom(nn.Module):
    """A linear layer of the user's own class (it calls F.linear on its weight)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(n_in)))

    def forward(self, x):
        return F.linear(x, self.weight)


class _Aliases(nn.Module):
    """Two linear modules tying one weight, a table registered under two names, a layer of the user's class and one
    the forward pass never calls."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 300)
        self.alias = self.emb
        self.fc = nn.Linear(300, 300, bias=False)
        self.fc2 = nn.Linear(300, 300, bias=False)
        self.fc2.weight = self.fc.weight
        self.mine = _Custom(300, 300)
        self.spare = _Custom(300, 300)

    def forward(self, ids):
        return self.mine(self.fc2(torch.relu(self.fc(self.emb(ids)))))


def test_weights_tied_across_modules_or_aliased_are_one_target_with_every_use():
    targets = select_targets(_Aliases(), QuantConfig(linear_types=f"torch.nn.Linear,{__name__}._Custom"))
    assert {k: t.uses for k, t in targets.items()} == {"emb.weight": ["emb", "alias"], "fc.weight": ["fc", "fc2"],
                                                       "mine.weight": ["mine"], "spare.weight": ["spare"]}
    assert targets["mine.weight"].matrix is None  # held by a module of linear_types: no trace claims it
    plain = select_targets(_Aliases(), QuantConfig())  # _Custom not named: its weight is a matrix only where used
    assert set(plain) == {"emb.weight", "fc.weight", "mine.weight"} and plain["mine.weight"].matrix is not None


@pytest.mark.parametrize("name, grid, method, bits, levels", [
    ("fp", "symmetric", "fp", 32, 0), ("pg-int8", "symmetric", "pg", 8, 0), ("int4", "symmetric", "rtn", 4, 15),
    ("int4", "midrise", "rtn", 4, 16), ("ternary", "midrise", "rtn", 2, 3), ("noise-0.5", "symmetric", "noise", 16, 0)])
def test_the_reports_header_names_the_regime_its_method_width_and_grid(name, grid, method, bits, levels):
    model = _Small()
    t0 = time.perf_counter()
    q, report = quantize_model(model, parse_regime(name), QuantConfig(grid=grid))
    wall = time.perf_counter() - t0
    assert (report.regime, report.method, report.bits, report.levels) == (name, method, bits, levels)
    assert 0 < report.seconds <= wall
    if name == "fp":  # the float model's own size: its state dict as stored
        sizes = artifact_sizes({k: v.detach().cpu() for k, v in model.state_dict().items()})
        assert (report.artifact_bytes_zlib, report.artifact_bytes_lzma) == (sizes["zlib"], sizes["lzma"])



class _Unreached(nn.Module):
    """A linear layer, a bank of three slices the forward pass uses two of, and four matrices it never uses."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(8)
        self.fc = nn.Linear(300, 300, bias=False)
        self.bank = nn.Parameter(torch.randn(3, 300, 300, generator=g) * 0.05)
        for i in range(4):
            setattr(self, f"u{i}", nn.Parameter(torch.randn(100, 100 + i, generator=g)))

    def forward(self, ids):
        return F.linear(F.linear(self.fc(F.one_hot(ids, 300).float()), self.bank[0]), self.bank[1])


def test_too_small_a_share_names_the_four_largest_parts_left_and_a_partly_reached_bank_by_what_is_left():
    from e2ettt.quant.apply import QuantSelectionError, require_targets

    tail = (": no linear module, embedding or F.linear/matmul in a forward pass uses them; set quant.min_share to accept "
            "that share")
    with pytest.raises(QuantSelectionError) as e:  # reached: fc and two of the bank's three slices, 270,000
        require_targets(_Unreached(), QuantConfig(min_numel=1000), "int4")
    assert str(e.value) == ("regime int4: reaches 67% of _Unreached's 400,600 matrix parameters (quant.min_share=0.9); "
                            "not reached: bank (90,000), u3 (10,300), u2 (10,200), u1 (10,100), ..." + tail)
    with pytest.raises(QuantSelectionError) as e:  # four parts left: all named, no ellipsis
        require_targets(_Unreached(), QuantConfig(min_numel=1000, keep_float="u0"), "int4")
    assert str(e.value) == ("regime int4: reaches 69% of _Unreached's 390,600 matrix parameters (quant.min_share=0.9); "
                            "not reached: bank (90,000), u3 (10,300), u2 (10,200), u1 (10,100)" + tail)
    exact = 270_000 / 400_600  # the share, element for element: half an element more is refused
    assert set(require_targets(_Unreached(), QuantConfig(min_numel=1000, min_share=exact), "int4")) == {
        "fc.weight", "bank.0", "bank.1"}
    with pytest.raises(QuantSelectionError, match="reaches 67%"):
        require_targets(_Unreached(), QuantConfig(min_numel=1000, min_share=270_000.5 / 400_600), "int4")
