"""predict's speed settings change how fast, not what: pipeline vs sequential, memory format,
precision, tile batch; and the pipeline's behaviour when memory is short or a later case fails."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import MODEL, SMALL, read_array, write_case

from diffprobe.cli.app import main
from diffprobe.predict import predictor
from diffprobe.predict.acceleration import InferenceSettings
from diffprobe.predict.memory import MemoryEstimate
from diffprobe.predict.predictor import predict, predict_logits, select_model
from diffprobe.probe.model import load_trained_probe


def three_cases(folder: Path) -> None:
    write_case(folder, "a", shape=SMALL, seed=1, spacing=(0.8, 0.8, 2.5))
    write_case(folder, "b", shape=SMALL, seed=2, ending=".mha")
    write_case(folder, "c", shape=(14, 44, 40), seed=3, spacing=(1.1, 0.9, 2.0))


def test_pipeline_equals_sequential_byte_for_byte(use_trained_probe_roots, tmp_path):
    three_cases(tmp_path / "in")
    timings: list[dict] = []
    piped = predict(tmp_path / "in", tmp_path / "piped", **MODEL, save_probabilities=True, show_progress=False,
                    timings=timings)
    seq = predict(tmp_path / "in", tmp_path / "seq", **MODEL, save_probabilities=True, show_progress=False,
                  settings=InferenceSettings(pipeline=False))
    assert [p.name for p in piped] == [p.name for p in seq] == ["a.nii.gz", "b.mha", "c.nii.gz"]
    for a, b in zip(piped, seq):
        assert a.read_bytes() == b.read_bytes(), a.name
        case = a.name.split(".")[0]
        with np.load(a.parent / f"{case}.npz") as pa, np.load(b.parent / f"{case}.npz") as pb:
            np.testing.assert_array_equal(pa["probabilities"], pb["probabilities"])
    assert [t["case"] for t in timings] == ["a", "b", "c"]
    for t in timings:  # every phase was timed, in whichever thread it ran
        assert {"preprocess_s", "guidance_s", "window_s", "argmax_s", "export_s"} <= set(t)
        assert all(v >= 0 for k, v in t.items() if k != "case")


def test_no_prefetch_when_memory_is_short(use_trained_probe_roots, tmp_path, monkeypatch):
    """With room for one case only, the cases run one after another (and still all get written)."""
    three_cases(tmp_path / "in")
    submitted = []
    real = predictor.load_case

    def spy(probes, case, timings=None, **options):
        submitted.append(case.identifier)
        return real(probes, case, timings, **options)

    monkeypatch.setattr(predictor, "load_case", spy)
    monkeypatch.setattr(predictor, "_room_to_prefetch", lambda *a: False)
    out = predict(tmp_path / "in", tmp_path / "out", **MODEL, show_progress=False)
    assert [p.name for p in out] == ["a.nii.gz", "b.mha", "c.nii.gz"] and all(p.is_file() for p in out)
    assert submitted == ["a", "b", "c"]


def test_room_to_prefetch_sums_the_overlapping_phases(monkeypatch):
    est = MemoryEstimate(raw_voxels=1, grid_voxels=1, read_bytes=3e9, window_bytes=2e9, write_bytes=1e9)
    monkeypatch.setattr(predictor, "available_bytes", lambda: 5.5e9)
    assert predictor._room_to_prefetch(est, est, None)        # window 2 + read 3 = 5 < 5.5
    assert not predictor._room_to_prefetch(est, est, est)     # + write 1 = 6 > 5.5
    assert not predictor._room_to_prefetch(est, None, None)   # unreadable header: no overlap
    huge = MemoryEstimate(raw_voxels=1, grid_voxels=1, read_bytes=1e9, window_bytes=9e9, write_bytes=1e9)
    assert not predictor._room_to_prefetch(est, huge, None)   # would be refused alone: never read ahead


def test_later_case_failure_keeps_the_earlier_ones(use_trained_probe_roots, tmp_path, capsys):
    """The pipeline reads case b while a is predicted; b is corrupt: a is written, the error names b."""
    write_case(tmp_path / "in", "a", shape=SMALL, seed=1)
    bad = write_case(tmp_path / "in", "b", shape=SMALL, seed=2)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # header readable (so it is prefetched), data cut
    code = main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "1", "-c",
                 MODEL["configuration"], "-device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "b_0000.nii.gz" in err
    assert (tmp_path / "out" / "a.nii.gz").is_file()
    assert not (tmp_path / "out" / "b.nii.gz").exists()


@pytest.fixture
def probe_and_volume(use_trained_probe_roots):
    """A probe trained past its near-initial state (the shared fixture's head has near-tie logits
    everywhere, which leave nothing for the bf16 comparison to compare)."""
    from diffprobe.probe.model import ProbeFolder
    from diffprobe.workflows.train_probe import train_probe

    if not ProbeFolder.of(1, "settings_check", "all").finished:
        train_probe(1, "all", "tiny", overrides={"steps": 40, "validate_every": 0, "lr": 2e-2, "warmup_steps": 0},
                    show_progress=False, final_validation=False, configuration="settings_check")
    folder = select_model(MODEL["dataset"], "settings_check", None)[0]
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1, 0.5, size=(1, 20, 60, 52)).astype(np.float32)
    return folder, volume


@pytest.mark.parametrize("settings", [InferenceSettings(channels_last=False, precision="fp32"),
                                      InferenceSettings(tile_batch=3, precision="fp32"),
                                      InferenceSettings(precision="bf16")], ids=["contiguous", "batch3", "bf16"])
def test_settings_keep_the_logits(probe_and_volume, settings):
    """Memory format and tile batch agree to float rounding; bf16 to bf16 rounding (argmax near-ties aside)."""
    folder, volume = probe_and_volume
    reference = predict_logits([load_trained_probe(folder)], volume, [2.0, 1.0, 1.0], torch.device("cpu"),
                               settings=InferenceSettings(channels_last=True, precision="fp32"))
    probe = load_trained_probe(folder)
    predictor.prepare_model(probe.model, settings)
    logits = predict_logits([probe], volume, [2.0, 1.0, 1.0], torch.device("cpu"), settings=settings)
    tol = 0.1 if settings.precision == "bf16" else 1e-4
    scale = reference.abs().max().item()
    assert (logits - reference).abs().max().item() <= tol * max(scale, 1.0)
    top2 = reference.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 2 * tol * max(scale, 1.0)  # voxels that are not near-ties
    assert clear.float().mean() > 0.5
    assert torch.equal(logits.argmax(0)[clear], reference.argmax(0)[clear])


def test_auto_precision_is_bf16_on_cuda_only(monkeypatch):
    """On a CPU without bf16 units (the detection is tests/test_precision.py's)."""
    from diffprobe.predict import acceleration

    monkeypatch.setattr(acceleration, "cpu_bf16_native", lambda flags=None: False)
    s = InferenceSettings()
    assert s.dtype(torch.device("cuda")) == torch.bfloat16
    assert s.dtype(torch.device("cpu")) == torch.float32
    assert InferenceSettings(precision="fp32").dtype(torch.device("cuda")) == torch.float32


@pytest.mark.parametrize("args, needle", [(["-precision", "fp8"], "-precision 'fp8'"),
                                          (["-tile_batch", "0"], "-tile_batch 0")])
def test_bad_speed_options_are_user_errors(use_trained_probe_roots, tmp_path, capsys, args, needle):
    write_case(tmp_path / "in", "a", shape=SMALL)
    code = main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "1", "-c",
                 MODEL["configuration"], *args])
    err = capsys.readouterr().err
    assert code == 1 and needle in err and "Traceback" not in err


def test_cli_speed_options_give_the_same_labels(use_trained_probe_roots, tmp_path):
    write_case(tmp_path / "in", "a", shape=SMALL, seed=5)
    base = ["predict", "-i", str(tmp_path / "in"), "-d", "1", "-c", MODEL["configuration"], "-device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "fast")]) == 0
    assert main([*base, "-o", str(tmp_path / "plain"), "--no_channels_last", "--sequential", "-tile_batch", "1",
                 "-precision", "fp32"]) == 0
    a, b = read_array(tmp_path / "fast" / "a.nii.gz"), read_array(tmp_path / "plain" / "a.nii.gz")
    assert (a == b).mean() > 0.999  # float rounding may flip an exact near-tie, nothing more
