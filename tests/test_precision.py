"""CPU bf16 detection and ``-precision auto`` (issue 16): detection on faked /proc/cpuinfo flags, what
``auto`` resolves to given the detection, and that the bf16 path produces label maps (not a timing test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffprobe.predict import acceleration
from diffprobe.predict.acceleration import InferenceSettings, auto_dtype, cpu_bf16_native, cpuinfo_flags

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
bogomips\t: 4000.00
"""


def fake_cpuinfo(monkeypatch: pytest.MonkeyPatch, extra: str) -> None:
    monkeypatch.setattr(acceleration, "_read_cpuinfo", lambda *a: CPUINFO.format(extra=extra))
    acceleration._detected_bf16.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_detection():
    acceleration._detected_bf16.cache_clear()
    yield
    acceleration._detected_bf16.cache_clear()


def test_cpuinfo_flags_are_parsed():
    assert {"avx2", "avx512_bf16"} <= cpuinfo_flags(CPUINFO.format(extra="avx512_bf16"))
    assert cpuinfo_flags("Features\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    assert cpuinfo_flags("") is None


@pytest.mark.parametrize("flags, native", [({"avx2", "avx512f"}, False), ({"avx512f", "avx512_bf16"}, True),
                                           ({"amx_tile", "amx_bf16"}, True), (set(), False)])
def test_detection_on_given_flags(flags, native):
    assert cpu_bf16_native(flags) is native


@pytest.mark.parametrize("extra, expected", [("", torch.float32), ("avx512_bf16", torch.bfloat16),
                                             ("amx_bf16 amx_tile", torch.bfloat16)])
def test_auto_follows_faked_cpuinfo(monkeypatch, extra, expected):
    fake_cpuinfo(monkeypatch, extra)
    assert cpu_bf16_native() is (expected == torch.bfloat16)
    expected_auto = expected if acceleration.AUTO_BF16_ON_NATIVE_CPU else torch.float32
    assert InferenceSettings(precision="auto").dtype(torch.device("cpu")) == expected_auto
    # explicit choices ignore the detection; CUDA's auto is bf16 whatever the CPU
    assert InferenceSettings(precision="fp32").dtype(torch.device("cpu")) == torch.float32
    assert InferenceSettings(precision="bf16").dtype(torch.device("cpu")) == torch.bfloat16
    assert InferenceSettings(precision="auto").dtype(torch.device("cuda")) == torch.bfloat16


def test_auto_without_cpuinfo_asks_torch(monkeypatch):
    monkeypatch.setattr(acceleration, "_read_cpuinfo", lambda *a: "")
    monkeypatch.setattr(acceleration, "_torch_reports_bf16", lambda: True)
    assert cpu_bf16_native() is True
    acceleration._detected_bf16.cache_clear()
    monkeypatch.setattr(acceleration, "_torch_reports_bf16", lambda: False)
    assert cpu_bf16_native() is False


def test_no_onednn_means_no_bf16(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert cpu_bf16_native({"avx512_bf16"}) is False
    fake_cpuinfo(monkeypatch, "avx512_bf16")
    assert auto_dtype(torch.device("cpu")) == torch.float32


def test_auto_policy_switch(monkeypatch):
    """bf16 on a native CPU only while the measured agreement allows it (AUTO_BF16_ON_NATIVE_CPU)."""
    monkeypatch.setattr(acceleration, "AUTO_BF16_ON_NATIVE_CPU", False)
    assert auto_dtype(torch.device("cpu"), cpu_bf16=True) == torch.float32
    monkeypatch.setattr(acceleration, "AUTO_BF16_ON_NATIVE_CPU", True)
    assert auto_dtype(torch.device("cpu"), cpu_bf16=True) == torch.bfloat16
    assert auto_dtype(torch.device("cpu"), cpu_bf16=False) == torch.float32


def test_bf16_path_produces_labels(use_trained_probe_roots, tmp_path: Path):
    """bf16 autocast end to end on the CPU: a label map of the input's shape with the dataset's labels."""
    from diffprobe.predict.predictor import predict

    raw = use_trained_probe_roots["raw"] / "Dataset001_Phantoms"
    written = predict(raw / "imagesTs", tmp_path / "bf16", dataset=1, configuration="tiny__fpn", folds=["all"],
                      device="cpu", show_progress=False, settings=InferenceSettings(precision="bf16"))
    assert written
    for out in written:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        image = sitk.ReadImage(str(raw / "imagesTs" / out.name.replace(".nii.gz", "_0000.nii.gz")))
        assert seg.shape == sitk.GetArrayViewFromImage(image).shape
        assert set(np.unique(seg).tolist()) <= set(range(7))
