"""make_phantoms -> plan_and_preprocess through the CLI, on small anisotropic phantoms."""

import json

import numpy as np

from diffprobe.cli.app import main


def test_phantoms_plan_and_preprocess_cli(roots):
    assert main(["make_phantoms", "-d", "3", "--num_labelled", "3", "--num_unlabelled", "2", "--num_test", "1",
                 "--fov_mm", "60"]) == 0
    raw = roots["raw"] / "Dataset003_Phantoms"
    assert len(list((raw / "imagesTr").glob("*_0000.nii.gz"))) == 5 and len(list((raw / "labelsTr").iterdir())) == 3
    # the data's own spacing rule (the CPU default class `cpu` would floor in-plane spacing at 1.5 mm)
    assert main(["plan-and-preprocess", "-d", "003", "-np", "2", "--size_class", "small"]) == 0
    out = roots["preprocessed"] / "Dataset003_Phantoms" / "diffprobe"
    fp = json.loads((out / "dataset_fingerprint.json").read_text())
    plans = json.loads((out / "plans.json").read_text())
    assert fp["num_cases"] == 5 and fp["num_labelled"] == 3
    # phantoms have thick slices: z is the coarse axis of the target spacing
    ts = plans["preprocessing"]["target_spacing"]
    assert ts[0] > 1.4 and ts[1] == ts[2] and ts[1] < 1.1
    assert plans["labels"]["kidney_left"] == 4
    assert len(list((out / "data").glob("*.json"))) == 5 and len(list((out / "data").glob("*_seg.b2nd"))) == 3
    # CT window [-1350, 1000] -> [-1, 1]: air (-1000 HU, bbox corners) at -0.70, bone (>= 400 HU) above 0.49
    import blosc2

    arr = blosc2.open(str(out / "data" / "phantom_000.b2nd"))[...]
    hu = (arr + 1) / 2 * 2350 - 1350
    assert abs(np.percentile(hu, 0.5) + 1000) < 60
    assert hu.max() > 400 and arr.max() <= 1.0
