"""Your record, as the parameter-golf records ship it: your model class, your own artifact, your data.

The worked record is `e2ettt/examples/record_lm.py` (banked matrices applied with F.linear, forward(ids, targets)
returning a loss, its own int6 + Brotli artifact); these tests bring it in as a user would.
"""
import io
import lzma
import math
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import brotli
import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from e2ettt import data
from e2ettt.checkpoint import CheckpointError, byte_unshuffle, read_weights
from e2ettt.cli import main as cli
from e2ettt.evaluate import DeviceTables, as_tensor, eval_val
from e2ettt.examples import record_lm as R
from e2ettt.quant.apply import QuantSelectionError, quantize_model, require_targets
from e2ettt.quant.regimes import QuantConfig, parse_regime
from e2ettt.source import SourceConfig, build_model, load_source_model, resolve, with_output
from e2ettt.tokenizer import build_byte_tables, load_tokenizer
from sweeps import healing_grid

REPO = Path(__file__).resolve().parent.parent
SMALL = QuantConfig(min_numel=4096)


@pytest.fixture(scope="module")
def record(tiny_inputs, tmp_path_factory):
    """A record folder of the worked example, trained briefly on the tiny demo's train split."""
    out = tmp_path_factory.mktemp("record")
    tokens = torch.as_tensor(data.load_tokens(tiny_inputs.data_dir, "train"))
    model = R.pretrain(tokens, R.RecordConfig(), steps=40, log=lambda *a: None)
    torch.save(model.state_dict(), out / "final_model.pt")
    R.write_artifact(model.state_dict(), out / "final_model.int6.ptz")
    return out


def record_args(record, tiny_inputs):
    return ["--checkpoint", str(record / "final_model.pt"), "--data", str(tiny_inputs.data_dir),
            "--tokenizer", str(tiny_inputs.tokenizer), "--model-fn", f"{REPO}/e2ettt/examples/record_lm.py:build",
            "--model-output", "method:forward_logits"]


def test_one_artifact_in_brotli_lzma_and_zlib_decodes_to_the_same_weights(record, tmp_path):
    state = torch.load(record / "final_model.pt", weights_only=True)
    decoded = {}
    for comp in ("brotli", "lzma", "zlib"):
        R.write_artifact(state, tmp_path / f"a.{comp}", compressor=comp)
        w = read_weights(tmp_path / f"a.{comp}")
        assert w.format.startswith("int6_per_row") and "byte-shuffled" in w.format
        decoded[comp] = w.state
    for name, t in decoded["brotli"].items():
        assert torch.equal(t, decoded["lzma"][name]) and torch.equal(t, decoded["zlib"][name])
    # what the reader gives is codes × fp16 row scales, computed here from the stored bytes without the reader
    obj = torch.load(io.BytesIO(byte_unshuffle(brotli.decompress((tmp_path / "a.brotli").read_bytes()))),
                     weights_only=True)
    q, s = obj["w"]["blocks.1.mlp.fc.weight.q"], obj["w"]["blocks.1.mlp.fc.weight.scale"]
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 31 and s.dtype == torch.float16  # int6 codes
    assert torch.equal(decoded["brotli"]["blocks.1.mlp.fc.weight"], q.float() * s.float()[:, None])


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_truncated_or_foreign_artifact_is_one_line_naming_it_and_the_formats_tried(record, tiny_inputs, tmp_path,
                                                                                      capsys, damage):
    bad = tmp_path / "bad.ptz"
    blob = (record / "final_model.int6.ptz").read_bytes()
    bad.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"GGUF" + bytes(500))
    code = cli(["quantize", *record_args(record, tiny_inputs), "--regimes", "fp", "--artifact", f"mine={bad}",
                "--artifact-fn", "e2ettt.examples.record_lm:load_artifact"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(bad) in err and "tried: torch.save, zlib, lzma/xz, Brotli" in err and "Traceback" not in err


def test_the_banked_model_is_quantized_where_it_multiplies(record):
    model = with_output(R.build(str(record / "final_model.pt")), "method:forward_logits")
    q, report = quantize_model(model, parse_regime("int6"), SMALL)
    sel = report.selection
    assert sel["reached"] / sel["matrix_parameters"] >= 0.9
    banks = {t["name"].rsplit(".", 1)[0] for t in report.tensors if t["name"].split(".")[0].endswith("bank")}
    assert banks == {"qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"}  # the report lists the bank slices
    assert len(sel["outside_modules"]) == 4 * 4 + 2 * 4  # every slice of every bank: no module holds them
    moved = q.state_dict()["kv_bank"] - model.state_dict()["kv_bank"]
    assert all(moved[i].abs().max() > 0 for i in range(moved.shape[0]))  # each slice is on the int6 grid now
    looped = next(t for t in report.tensors if t["name"] == "qo_bank.1")
    assert looped["uses"] == ["linear in the forward pass (2x)"]  # a recurrent layer: one matrix, two uses


def test_gptq_calibrates_bank_slices_from_their_own_inputs(record, tiny_inputs):
    model = with_output(R.build(str(record / "final_model.pt")), "method:forward_logits")
    calib = torch.as_tensor(data.load_tokens(tiny_inputs.data_dir, "train", limit=4096))
    _, report = quantize_model(model, parse_regime("gptq-int4"), SMALL, calib)
    hooked = [t for t in report.tensors if "proxy_loss" in t]
    assert {t["name"] for t in hooked} >= {"qo_bank.0", "kv_bank.4", "mlp_down_bank.3"}
    assert all(t["proxy_loss"] <= t["rtn_proxy_loss"] * 1.0001 for t in hooked)


class Hidden(torch.nn.Module):
    """The record model behind an adapter that multiplies the banks by einsum, which no tracer here follows."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        x = self.inner.tok_emb(ids)
        for i in range(self.inner.cfg.num_layers):
            x = x + torch.einsum("btd,ed->bte", x, self.inner.qo_bank[i])
        return F.linear(x, self.inner.tok_emb.weight)


def hidden_build(path):
    return Hidden(R.build(path))


def test_a_model_whose_matrices_cannot_be_reached_is_one_line_not_a_sweep(record, tiny_inputs, tmp_path, capsys):
    with pytest.raises(QuantSelectionError, match=r"reaches \d+% of Hidden's .* not reached: inner.mlp_up_bank"):
        require_targets(hidden_build(str(record / "final_model.pt")), SMALL, "int6")
    (tmp_path / "hidden_model.py").write_text("from tests.test_record import hidden_build\n")
    code = healing_grid.main(["--checkpoint", str(record / "final_model.pt"), "--data", str(tiny_inputs.data_dir),
                              "--tokenizer", str(tiny_inputs.tokenizer), "--model-fn", f"{tmp_path}/hidden_model.py:hidden_build",
                              "--smoke", "--regimes", "fp,int6", "--set", "quant.min_numel=4096", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "quant.min_share" in err, err


def test_lora_reaches_the_banks_and_starts_as_the_model(record):
    from e2ettt.adapt import select_params

    model = with_output(R.build(str(record / "final_model.pt")), "method:forward_logits")
    ids = torch.arange(32)[None] % 1000
    before = model(ids)
    chosen = select_params(model, "lora:4")
    assert len(chosen) == 8  # A and B for each of the four banks
    assert torch.equal(model(ids), before)


def test_model_fn_as_a_file_path_or_a_module_in_the_current_directory(record, tiny_inputs, tmp_path, monkeypatch):
    (tmp_path / "my_record.py").write_text("from e2ettt.examples.record_lm import build\n")
    monkeypatch.chdir(tmp_path)
    files = {"checkpoint": str(record / "final_model.pt"), "data": str(tiny_inputs.data_dir),
             "tokenizer": str(tiny_inputs.tokenizer), "model_output": "method:forward_logits"}
    by_module = resolve(SourceConfig(model_fn="my_record:build", **files), log=lambda *a: None)
    by_path = resolve(SourceConfig(model_fn="./my_record.py:build", **files), log=lambda *a: None)
    assert by_module.model_fn == by_path.model_fn == f"{tmp_path.resolve()}/my_record.py:build"  # every worker finds it
    monkeypatch.chdir(REPO)  # a worker's working directory is elsewhere
    model = load_source_model(by_module)
    assert type(model).__name__ == "RecordGPT" and model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 1024)


def test_a_forward_that_returns_a_loss_says_which_flag_to_give(record, tiny_inputs):
    files = {"checkpoint": str(record / "final_model.pt"), "data": str(tiny_inputs.data_dir),
             "tokenizer": str(tiny_inputs.tokenizer)}
    with pytest.raises(ValueError, match="--model-output method:NAME"):
        resolve(SourceConfig(model_fn=f"{REPO}/e2ettt/examples/record_lm.py:build", **files))
    with pytest.raises(ValueError, match="has no method 'logits'"):
        resolve(SourceConfig(model_fn=f"{REPO}/e2ettt/examples/record_lm.py:build", model_output="method:logits", **files))


def test_the_model_fn_gets_the_device_and_dtype_and_nothing_casts_its_model(record):
    model = build_model(f"{REPO}/e2ettt/examples/record_lm.py:build", str(record / "final_model.pt"), "cpu",
                        torch.bfloat16, "method:forward_logits")
    assert model.qo_bank.dtype == torch.bfloat16 and model.blocks[0].q_gain.dtype == torch.float32


def test_a_state_dict_of_another_architecture_names_its_keys_and_the_way_in(record, tiny_inputs, capsys):
    sd = torch.load(tiny_inputs.checkpoint, weights_only=True)
    sd["skip_gates"] = torch.zeros_like(sd["skip_weights"])  # what a #1493 final_model.pt holds beside the baseline's
    path = record / "pr1493_like.pt"
    torch.save(sd, path)
    code = cli(["quantize", "--checkpoint", str(path), "--data", str(tiny_inputs.data_dir),
                "--tokenizer", str(tiny_inputs.tokenizer), "--regimes", "fp"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unexpected ['skip_gates']" in err and "--model-fn" in err


def test_byte_sidecars_are_not_tokens_and_give_each_target_its_bytes(tiny_inputs, tmp_path):
    plain, side = tmp_path / "plain", tmp_path / "side"
    for d in (plain, side):
        d.mkdir()
        for shard in tiny_inputs.data_dir.glob("*.bin"):
            shutil.copy(shard, d / shard.name)
    tokens = data.load_tokens(plain, "val")
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, tokens.size)  # any per-token byte budget, e.g. CaseOps' original-text bytes
    val_name = next(plain.glob("*_val_*.bin")).name
    data.write_shard(side / val_name.replace("_val_", "_val_bytes_"), counts)
    assert np.array_equal(data.load_tokens(side, "val"), tokens)  # the sidecar is never read as tokens
    inputs = resolve(SourceConfig(checkpoint=str(tiny_inputs.checkpoint), data=str(side),
                                  tokenizer=str(tiny_inputs.tokenizer)))
    assert inputs.sidecar
    model = load_source_model(inputs)
    segment = tokens[: 1 + 1024]
    tables = DeviceTables.from_tables(build_byte_tables(load_tokenizer(tiny_inputs.tokenizer)))
    got = eval_val(model, as_tensor(segment), 128, tables.for_stream(counts[: 1 + 1024]))
    with torch.no_grad():
        x, y = torch.as_tensor(segment[:-1]).view(-1, 128), torch.as_tensor(segment[1:]).view(-1, 128)
        nll = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").double().sum().item()
    assert got.bpb == pytest.approx(nll / (math.log(2) * counts[1 : 1 + 1024].sum()), rel=1e-9)


def test_a_sidecar_without_its_shard_or_a_shard_without_its_sidecar_is_named(tiny_inputs, tmp_path):
    for shard in tiny_inputs.data_dir.glob("*.bin"):
        shutil.copy(shard, tmp_path / shard.name)
    val = next(tmp_path.glob("*_val_*.bin"))
    data.write_shard(tmp_path / "other_val_bytes_000000.bin", np.ones(10))
    with pytest.raises(data.ShardError, match="other_val_bytes_000000.bin has no token shard other_val_000000.bin"):
        data.find_sidecars(tmp_path, "val")
    (tmp_path / "other_val_bytes_000000.bin").unlink()
    data.write_shard(tmp_path / val.name.replace("_val_", "_val_bytes_"), np.ones(10))
    with pytest.raises(data.ShardError, match="entries for the"):
        data.load_sidecar(tmp_path, "val")
    data.write_shard(tmp_path / "x_val_000009.bin", np.ones(10))
    with pytest.raises(data.ShardError, match="x_val_000009.bin has no byte sidecar"):
        data.find_sidecars(tmp_path, "val")


# --- through the sweep ----------------------------------------------------------------------------------------------

def plain_bpb(model_logits, tokenizer: str, seg: np.ndarray, first: int, context: int) -> float:
    """bpb of non-overlapping windows of `context` targets from position `first`, written out here: nats from
    cross-entropy, bytes from the SentencePiece pieces (the leading-space rule), no e2ettt code."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    boundary = {i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)}

    def nbytes(prev: int, tok: int) -> int:
        if tok in boundary:
            return 0
        if sp.is_byte(tok):
            return 1
        piece = sp.id_to_piece(tok)
        lead = piece.startswith("\u2581")
        return len(piece[1:].encode() if lead else piece.encode()) + (lead and prev not in boundary)

    nats = count = 0.0
    for a in range(first, seg.size, context):
        x = torch.as_tensor(seg[a - 1 : a - 1 + context])[None]
        y = torch.as_tensor(seg[a : a + context])
        with torch.no_grad():
            nats += F.cross_entropy(model_logits(x)[0].float(), y, reduction="sum").double().item()
        count += sum(nbytes(int(p), int(t)) for p, t in zip(seg[a - 1 : a - 1 + context], seg[a : a + context]))
    return nats / (math.log(2) * count)


def plain_decode(path: Path) -> dict:
    """The worked record's artifact decoded here without e2ettt: Brotli, the byte shuffle, codes × scales, banks."""
    blob = brotli.decompress(path.read_bytes())
    assert blob[:4] == b"BSHF"
    half = (len(blob) - 5 + 1) // 2
    raw = np.empty(len(blob) - 5, np.uint8)
    raw[0::2], raw[1::2] = np.frombuffer(blob[5 : 5 + half], np.uint8), np.frombuffer(blob[5 + half :], np.uint8)
    obj = torch.load(io.BytesIO(raw.tobytes()), weights_only=True)
    flat = {}
    for name, how in obj["m"].items():
        if how.startswith("passthrough"):
            flat[name] = obj["w"][name].float()
        else:
            flat[name] = obj["w"][name + ".q"].float() * obj["w"][name + ".scale"].float()[:, None]
    L = 1 + max(int(k.split(".")[1]) for k in flat if k.startswith("blocks."))
    out = {k: v for k, v in flat.items() if not re.search(r"\.(attn\.(c_q|c_k|c_v|proj)|mlp\.(fc|proj))\.weight$", k)}
    out["qo_bank"] = torch.stack([flat[f"blocks.{i}.attn.c_q.weight"] for i in range(L)]
                                 + [flat[f"blocks.{i}.attn.proj.weight"] for i in range(L)])
    out["kv_bank"] = torch.stack([flat[f"blocks.{i}.attn.c_k.weight"] for i in range(L)]
                                 + [flat[f"blocks.{i}.attn.c_v.weight"] for i in range(L)])
    out["mlp_up_bank"] = torch.stack([flat[f"blocks.{i}.mlp.fc.weight"] for i in range(L)])
    out["mlp_down_bank"] = torch.stack([flat[f"blocks.{i}.mlp.proj.weight"] for i in range(L)])
    return out


def readme_block(marker: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def readme_record():
    """The README's "Your record" commands run as printed, from the repository's root (the session's demo cache),
    but for the pretraining, cut from 300 to 60 steps with the example's own flag: the record folder they write and
    the rows of their sweep. record/ and runs/record are removed after."""
    import pandas as pd

    made = [REPO / "record", REPO / "runs" / "record"]
    if any(p.exists() for p in made):
        pytest.skip("record/ or runs/record already exist here: not overwriting a user's files")
    try:
        for line in readme_block("your-record"):
            command = line.split("#")[0].strip().replace("python ", f"{sys.executable} ", 1)
            if "-m e2ettt.examples.record_lm" in command:
                command += " --steps 60"
            done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        yield made[0], pd.read_parquet(made[1] / "trials.parquet")
    finally:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)


@pytest.mark.slow
def test_the_readmes_your_record_commands_run_as_printed(readme_record):
    _, rows = readme_record
    assert set(rows["regime"]) == {"fp", "mine", "int6"} and (rows["status"] == "ok").all()


@pytest.mark.slow
def test_your_record_through_the_sweep_paired_with_the_same_fp_rows(readme_record):
    """The README's run read again: `mine` is the artifact, its damage what this test's own decoder and windows
    loop make of the file, and it shares its fp rows with e2ettt's own int6 of the same float model."""
    record, rows = readme_record
    assert (rows["status"] == "ok").all(), rows[["regime", "status", "error"]]
    mine = rows[rows["regime"] == "mine"]
    assert len(mine) >= 1 and (mine["family"] == "own").all()
    assert mine["weights_decoder"].str.contains("load_artifact").all()
    assert (mine["artifact_bytes"] == (record / "final_model.int6.ptz").stat().st_size).all()
    fp = rows[rows["regime"] == "fp"].set_index("control_key")
    for regime in ("mine", "int6"):
        assert set(rows.loc[rows["regime"] == regime, "control_key"]) == set(fp.index)  # the same fp rows
    # mine's damage, evaluated here from the file and the checkpoint with loops of this test's own
    val = data.load_tokens(record / "data", "val")
    fp_model = R.build(str(record / "final_model.pt"))
    own = R.RecordGPT(R.config_of(fp_model.state_dict()))
    own.load_state_dict(plain_decode(record / "final_model.int6.ptz"))
    tokenizer = str(record / "tokenizer.model")
    for _, row in mine.iterrows():
        start, context, n = int(row["segment_start"]), int(row["context"]), int(row["tokens_scored"])
        prefix = min(context, start)
        seg = val[start - prefix : start + n + 1]
        damage = (plain_bpb(own.forward_logits, tokenizer, seg, prefix + 1, context)
                  - plain_bpb(fp_model.forward_logits, tokenizer, seg, prefix + 1, context))
        assert abs(row["damage"] - damage) < 1e-6, (row["seed"], row["damage"], damage)
    # e2ettt's own int6 of the same float model is a different file from the record's: it moves the scores, and it
    # is not the artifact's damage
    int6 = rows[rows["regime"] == "int6"].set_index("control_key")["damage"]
    assert (int6.abs() > 0).all()
    assert not np.allclose(int6.sort_index(), mine.set_index("control_key")["damage"].sort_index())


def test_the_example_artifact_in_other_containers_and_junk_payloads(tmp_path):
    torch.save({"config": 1}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="none of the formats e2ettt reads"):
        read_weights(tmp_path / "odd.pt")
    (tmp_path / "z.bin").write_bytes(zlib.compress(b"hello"))
    with pytest.raises(CheckpointError, match="zlib: decompressed, but not torch.save bytes"):
        read_weights(tmp_path / "z.bin")
    (tmp_path / "x.xz").write_bytes(lzma.compress(b"hello")[:10])
    with pytest.raises(CheckpointError, match="lzma"):
        read_weights(tmp_path / "x.xz")
