import dataclasses
import io
import zlib

import pytest
import torch

from e2ettt.checkpoint import CheckpointError, infer_config, load_model, load_state_dict
from e2ettt.model import GPT, GPTConfig, count_parameters
from e2ettt.quant import pg_int8


def parameter_golf_names(L=9):
    names = {"tok_emb.weight", "skip_weights"}
    for i in range(L):
        for n in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight", "attn.q_gain",
                  "mlp.fc.weight", "mlp.proj.weight", "attn_scale", "mlp_scale", "resid_mix"):
            names.add(f"blocks.{i}.{n}")
    return names


def test_baseline_size_and_names():
    model = GPT(GPTConfig())
    assert count_parameters(model) == 17_059_912
    sd = model.state_dict()
    assert set(sd) == parameter_golf_names()
    assert sd["blocks.0.attn.c_k.weight"].shape == (256, 512)
    assert sd["skip_weights"].shape == (4, 512)
    assert torch.equal(sd["blocks.3.resid_mix"], torch.stack((torch.ones(512), torch.zeros(512))))


def test_strict_load_of_a_parameter_golf_state_dict(tmp_path, random_gpt):
    cfg = random_gpt.cfg
    sd = {k: v.clone() for k, v in random_gpt.state_dict().items()}
    sd["tok_emb.weight"] = sd["tok_emb.weight"].bfloat16()  # parameter-golf may store the embedding in bf16
    path = tmp_path / "final_model.pt"
    torch.save(sd, path)
    model = load_model(path, cfg)
    assert infer_config(load_state_dict(path)) == cfg
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    ref = GPT(cfg)
    ref.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_shape_and_vocab_mismatch_are_clear(tmp_path, random_gpt):
    path = tmp_path / "m.pt"
    torch.save(random_gpt.state_dict(), path)
    wrong = dataclasses.replace(random_gpt.cfg, model_dim=64)
    with pytest.raises(CheckpointError, match=r"m.pt: skip_weights has shape \(1, 32\), the model config expects \(1, 64\)"):
        load_model(path, wrong)
    with pytest.raises(CheckpointError, match="vocabulary is 64 .* tokenizer has 1024 pieces"):
        load_model(path, vocab_size=1024)
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="junk.pt: not a weights file e2ettt can read .*tried: torch.save, zlib, lzma"):
        load_model(tmp_path / "junk.pt")


def test_reads_the_int8_artifact(tmp_path, random_gpt):
    obj = pg_int8.quantize_state_dict(random_gpt.state_dict())
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = tmp_path / "final_model.int8.ptz"
    path.write_bytes(zlib.compress(buf.getvalue(), 9))
    model = load_model(path)
    for k, v in pg_int8.dequantize_state_dict(obj).items():
        assert torch.equal(model.state_dict()[k], v.float())


def test_bf16_autocast_runs_close_to_fp32_with_attention_in_bf16(random_gpt, monkeypatch):
    """Under bf16 autocast, as the records evaluate, q, k and v reach attention in bf16 (the dtype flash attention
    takes on a GPU): the rotary tables and q_gain are cast to the activations' dtype rather than promoting them."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randint(0, 64, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = random_gpt(x)
    assert seen == [(torch.bfloat16,) * 3] * 2  # both layers
    assert low.dtype == torch.float32
    assert (low - random_gpt(x)).abs().max() < 0.2


def test_the_forward_makes_no_tensor_off_the_models_device(random_gpt):
    """On the meta device (a stand-in for a GPU here): a tensor made on the CPU, such as RoPE's positions without the
    model's device, cannot meet the model's."""
    meta = random_gpt.to("meta")
    out = meta(torch.randint(0, 64, (2, 16)).to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 16, 64)


def test_initialisation_and_config_checks_say_what_is_wrong():
    torch.manual_seed(0)
    emb = GPT(GPTConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1)).tok_emb.weight
    assert emb.std().item() == pytest.approx(0.005, rel=0.05)  # tied_embed_init_std, as parameter-golf
    for kw, says in [({"model_dim": 30, "num_heads": 4}, "model.model_dim=30 is not divisible by model.num_heads=4"),
                     ({"num_heads": 8, "num_kv_heads": 3}, "model.num_heads=8 is not divisible by model.num_kv_heads=3"),
                     ({"model_dim": 24, "num_heads": 8, "num_kv_heads": 4}, "model head_dim must be even for RoPE")]:
        with pytest.raises(ValueError) as err:
            GPTConfig(**kw).validate()
        assert str(err.value) == says
