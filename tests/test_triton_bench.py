"""triton_kernels.bench: the CPU path (no timings, a correctness sweep) and the harness's own arithmetic."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU on CI machines

import csv
import types

import pytest
import torch

import triton_kernels
from mistral_ref.attention import attention_mask
from triton_kernels import bench

pytestmark = pytest.mark.triton


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path runs only without a GPU")
def test_cpu_path_reports_no_timings_and_runs_the_correctness_sweep(tmp_path, capsys):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU" in out and "nothing is timed" in out
    with open(tmp_path / "kernels-correctness.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["family"] for r in rows} == {"prefill", "decode", "moe", "rms_norm", "rope", "latent_decode", "fine_moe"}
    assert all(r["status"] == "pass" for r in rows)
    assert all(r["ms"] == r["tflops"] == r["gbps"] == r["roofline_frac"] == "" for r in rows)  # no timings
    assert all(float(r["max_err"]) <= float(r["tolerance"]) for r in rows)


def test_correctness_sweep_catches_a_wrong_kernel():
    """The sweep compares against the reference: an attention kernel that is slightly off must FAIL."""
    def off_by_a_bit(*args, **kwargs):
        return triton_kernels.attention(*args, **kwargs) * 1.001

    broken = types.SimpleNamespace(**{name: getattr(triton_kernels, name) for name in triton_kernels.__all__})
    broken.attention = off_by_a_bit
    rows = bench.correctness_sweep(quick=True, kernels=broken, models=("mistral-7b-v0.1",))
    status = {(r.family, r.model, r.dtype): r.status for r in rows}
    assert status[("prefill", "mistral-7b-v0.1", "float32")] == "FAIL"
    assert status[("decode", "mistral-7b-v0.1", "float32")] == "pass"


@pytest.mark.parametrize("T, S, window", [(4, 4, None), (4, 4, 2), (3, 10, 4), (1, 32, None), (1, 32, 8)])
def test_attention_pair_count_matches_the_mask(T, S, window):
    q_pos = torch.arange(S - T, S)[None]
    k_pos = torch.arange(S)[None]
    assert bench.attention_pairs(T, S, window) == int(attention_mask(q_pos, k_pos, window).sum())


def test_device_peaks_table():
    assert bench.device_peaks("NVIDIA H100 80GB HBM3") == (989.0, 3350.0)
    assert bench.device_peaks("NVIDIA H100 PCIe") == (756.0, 2000.0)
    assert bench.device_peaks("NVIDIA A100-SXM4-40GB") == (312.0, 1555.0)
    assert bench.device_peaks("NVIDIA A10") == (125.0, 600.0)
    assert bench.device_peaks("NVIDIA L40S") == (362.0, 864.0)
    assert bench.device_peaks("Some Future GPU") == (None, None)  # no invented roofline
    assert bench.device_peaks("Some Future GPU", 100.0, 1000.0) == (100.0, 1000.0)


@pytest.mark.slow
def test_gpu_plumbing_with_a_stub_timer(tmp_path):
    """Rows, units and roofline of the GPU path, with a timer that reports 2 ms and runs nothing."""
    rows = bench.gpu_benchmarks(torch.float16, quick=True, peaks=(100.0, 1000.0), device="cpu",
                                timer=lambda fn: 2.0)
    families = {r.family for r in rows}
    # quick: Mistral-7B (no experts) and Mistral Small 4's latent decode (its 6.4 GB of experts only in full runs)
    assert families == {"prefill", "decode", "rms_norm", "rope", "latent_decode"}
    latent = [r for r in rows if r.family == "latent_decode" and r.shape.startswith("B=8 ctx=4096 ")]
    assert [r.provider for r in latent] == ["torch-absorbed", "triton"]
    flops, nbytes = bench.latent_decode_work(8, 4096, 32, 64, 64, 128, 256, 2)
    assert flops == 2.0 * 8 * 32 * (192 * 256 + 4096 * 576)  # absorption + output, scores + latent output
    assert latent[1].tflops == pytest.approx(flops / 2e-3 / 1e12)
    assert latent[1].gbps == pytest.approx(nbytes / 2e-3 / 1e9)
    prefill = [r for r in rows if r.family == "prefill" and r.shape.startswith("B=1 T=512 ")]
    assert [r.provider for r in prefill] == ["torch-eager", "torch-sdpa", "triton"]
    flops, nbytes = bench.attention_work(1, 512, 512, 32, 8, 128, 4096, 2)
    assert prefill[0].tflops == pytest.approx(flops / 2e-3 / 1e12)
    assert prefill[0].gbps == pytest.approx(nbytes / 2e-3 / 1e9)
    assert prefill[0].roofline_frac == pytest.approx(max(flops / 100e12, nbytes / 1000e9) / 2e-3)
    bench.write_csv(rows, tmp_path / "k.csv")
    with open(tmp_path / "k.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    pytest.importorskip("matplotlib")
    assert bench.write_plot(rows, tmp_path / "k.png") and (tmp_path / "k.png").stat().st_size > 0


@pytest.mark.slow
def test_gpu_path_times_under_inference_mode_and_survives_a_raising_provider():
    """The kernels refuse inputs autograd would track (an RMSNorm weight is a Parameter): the harness times under
    inference_mode. A provider that raises becomes a row saying so, and the next ones are still timed."""
    seen = []

    def timer(fn):
        seen.append(torch.is_grad_enabled())
        if len(seen) == 1:
            raise RuntimeError("kernel exploded\nsecond line")
        return 2.0

    rows = bench.gpu_benchmarks(torch.float16, quick=True, peaks=(None, None), device="cpu", timer=timer)
    assert not any(seen) and len(seen) == len(rows)
    assert rows[0].status == "error: RuntimeError: kernel exploded" and rows[0].ms is None
    assert all(r.status == "ok" for r in rows[1:])


def test_sweep_wrapper_moves_tensors_to_the_device_and_back():
    calls = []

    def kernel(x, y, *, z):
        calls.append((x.device, y, z.device))
        return x.device.type, 7  # (a meta tensor cannot come back: the move to the CPU runs on the GPU machine)

    out = bench._on_device(kernel, "meta")(torch.ones(2), 3, z=torch.ones(2))
    assert calls == [(torch.device("meta"), 3, torch.device("meta"))]
    assert out == ("meta", 7)


def test_tile_sweep_rows_with_a_stub_timer():
    """The sweep's rows (a dry run on the meta device: nothing is allocated or run): the default tiles first,
    each beside PyTorch's fastest, TFLOP/s from the same work counts as the main harness."""
    rows = bench.tile_sweep(torch.bfloat16, peaks=(989.0, 4800.0), device="meta", timer=lambda fn: 2.0)
    prefill = [r for r in rows if r.family == "prefill"]
    moe = [r for r in rows if r.family == "moe"]
    fine = [r for r in rows if r.family == "fine_moe"]
    assert len(prefill) == 3 * (1 + len(bench.PREFILL_TILES))
    assert len(moe) == len(fine) == 2 * (1 + len(bench.MOE_TILES))
    assert prefill[0].provider == "torch-sdpa" and prefill[1].provider == "triton 64x64 w4 s2"
    # the MoE kernels' defaults for bf16 first, then the previous ones
    assert triton_kernels.moe_tiles(torch.bfloat16) == (64, 64, 64) == bench.MOE_TILES[0]
    assert moe[0].provider == fine[0].provider == "torch-loop" and moe[1].provider == "triton 64x64x64"
    flops, _ = bench.attention_work(1, 4096, 4096, 32, 8, 128, None, 2)
    assert prefill[1].tflops == pytest.approx(flops / 2e-3 / 1e12)
    assert all(r.status == "ok" for r in rows)


def test_prefill_launch_options_are_checked():
    from triton_kernels._common import interpreting

    device = "cpu" if interpreting() else "cuda"
    q = torch.zeros(1, 4, 2, 16, device=device)
    pos = torch.arange(4, device=device)[None]
    with pytest.raises(ValueError, match="num_warps"):
        triton_kernels.prefill_attention(q, q, q, pos, pos, None, num_warps=3)
