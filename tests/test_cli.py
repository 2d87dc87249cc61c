"""The `e2ettt` command line on the tiny demo's files (the 'real checkpoint' path)."""
import numpy as np
import pytest
import torch

from e2ettt import data
from e2ettt.cli import main
from e2ettt.source import SourceConfig, resolve


def files(demo):
    return ["--checkpoint", str(demo.checkpoint), "--data", str(demo.data_dir), "--tokenizer", str(demo.tokenizer)]


def test_quantize_prints_damage_and_sizes(tiny_demo, capsys):
    code = main(["quantize", *files(tiny_demo), "--regimes", "fp,int8,int3,gptq-int3",
                 "--set", "quant.min_numel=1024", "--set", "quant.calib_tokens=2048", "--set", "quant.calib_seq_len=128",
                 "--set", "ttt.max_tokens=2048", "--set", "ttt.context=128"])
    out = capsys.readouterr().out
    assert code == 0
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip().startswith(("fp", "int", "gptq"))}
    assert float(lines["fp"][2]) == 0.0
    assert float(lines["int3"][2]) > float(lines["int8"][2])  # fewer bits, more damage


def test_ttt_on_two_processes_prints_result_and_curve(tiny_demo, tmp_path, capsys):
    code = main(["ttt", *files(tiny_demo), "--regime", "int3", "--lr", "0.03", "--ranks", "2",
                 "--work-dir", str(tmp_path), "--set", "quant.min_numel=1024", "--set", "ttt.max_tokens=1024",
                 "--set", "ttt.chunk_tokens=256", "--set", "ttt.context=128"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "int3: pre-quant" in out and "on 2 cpu rank(s), fp32" in out and "first_chunk_delta" in out
    assert len([ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]) >= 4  # curve rows


def test_a_model_broken_before_any_update_is_measured_and_its_row_is_ok(tiny_demo, tmp_path, capsys):
    """Noise that leaves the model worse than a uniform guess before TTT starts; score-first TTT brings some back."""
    code = main(["ttt", *files(tiny_demo), "--regime", "noise-5", "--lr", "0.1", "--workers", "1",
                 "--work-dir", str(tmp_path), "--set", "quant.min_numel=1024", "--set", "ttt.max_tokens=2048",
                 "--set", "ttt.chunk_tokens=256", "--set", "ttt.context=128"])
    out = capsys.readouterr().out
    assert code == 0 and "status ok" in out, out
    post_quant, post_ttt = (float(out.split(k)[1].split()[0]) for k in ("post-quant ", "post-TTT "))
    damage = float(out.split("damage ")[1].split(",")[0])
    uniform = 10 / (tiny_demo.info["val_bytes"] / tiny_demo.info["val_tokens"])  # log2(1024) bits over bytes per token
    assert post_quant > uniform and damage > 0.5  # broken: worse than a uniform guess
    assert post_ttt < post_quant - 0.1  # measured, not called diverged, and TTT recovers part of it


def test_mismatched_tokenizer_and_bad_regime_are_one_line_errors(tiny_inputs, tmp_path, capsys):
    sd = torch.load(tiny_inputs.checkpoint, weights_only=True)
    sd["tok_emb.weight"] = torch.zeros(2048, sd["tok_emb.weight"].shape[1])
    bad = tmp_path / "big_vocab.pt"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="tok_emb.weight has 2048 rows but tokenizer .* has 1024 pieces"):
        resolve(SourceConfig(checkpoint=str(bad), data=str(tiny_inputs.data_dir), tokenizer=str(tiny_inputs.tokenizer)))
    assert main(["quantize", *files(tiny_inputs), "--regimes", "int3,q4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("e2ettt quantize: error: unknown quantization regime 'q4'") and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal on a machine without enough GPUs")
@pytest.mark.parametrize("cmd", [["ttt", "--regime", "int3", "--ranks", "64"], ["quantize", "--regimes", "int3"]])
def test_device_cuda_without_the_gpus_is_one_line_before_any_work(tiny_inputs, cmd, capsys):
    assert main([*cmd[:1], *files(tiny_inputs), *cmd[1:], "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"e2ettt {cmd[0]}: error: --device cuda: rank ") and "GPU" in err, err
    assert len(err.splitlines()) == 1 and "regime" not in captured.out  # refused before quantizing anything


def test_corrupt_shard_in_data_dir_is_named(tiny_inputs, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    tokens = data.read_shard(next(tiny_inputs.data_dir.glob("*_val_*.bin")))
    data.write_shard(d / "x_val_000000.bin", np.asarray(tokens))
    (d / "x_val_000001.bin").write_bytes(b"\x00" * 2000)
    args = ["quantize", "--checkpoint", str(tiny_inputs.checkpoint), "--data", str(d), "--tokenizer",
            str(tiny_inputs.tokenizer), "--regimes", "fp"]
    assert main(args) == 2
    assert "x_val_000001.bin: bad magic 0" in capsys.readouterr().err


def test_gpu_check_stops_with_one_line_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("gpu_check: no CUDA device here") and len(done.stderr.strip().splitlines()) == 1


def _options(help_text: str) -> list[str]:
    """Each option's block of help text (option line plus its wrapped description)."""
    blocks, current = [], None
    for line in help_text.splitlines():
        if line.startswith("  -") and not line.startswith("  -h"):
            current = [line]
            blocks.append(current)
        elif current is not None and line.startswith("    "):
            current.append(line)
        else:
            current = None
    return [" ".join(b) for b in blocks]


def test_every_flag_has_help_and_shows_its_default(capsys):
    from sweeps import healing_grid

    helps = []
    for argv, entry in ((["--help"], healing_grid.parse_args), (["quantize", "--help"], main), (["ttt", "--help"], main)):
        with pytest.raises(SystemExit):
            entry(argv)
        helps.append((argv, capsys.readouterr().out))
    for argv, text in helps:
        options = _options(text)
        assert len(options) >= 5, argv
        for opt in options:
            flag = opt.split()[0]
            switches = ("--smoke", "--dry-run", "--verbose", "--dashboard", "--rerun-stopped", "--grid", "--set")
            if flag in switches:  # switches and the open-ended ones: no default to show
                assert len(opt.split()) > 2, opt
                continue
            assert "default" in opt, f"{argv}: {opt}"
