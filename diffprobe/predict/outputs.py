"""What ``predict`` writes per case: a label map image (default), a DICOM SEG, or both (``--output_type``).

Why a separate step: the DICOM SEG is only meaningful for a DICOM series input (it references the
series' instances), so the choice is checked against the inputs *before* any model is loaded or
case predicted, and the file names (which ``--continue_prediction`` checks) follow from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.dataset.cases import Case
from diffprobe.errors import DiffprobeError
from diffprobe.io.geometry import Geometry
from diffprobe.io.image_io import write_image
from diffprobe.predict.inputs import input_cases, output_name

OUTPUT_TYPES = ("nifti", "dicom_seg", "both")
DICOM_SEG_ENDING = ".dcm"


def check_output_type(output_type: str, cases: list[Case] | None = None, inputs: str | Path | None = None) -> None:
    """Refuse an unknown output type, and a DICOM SEG for inputs that are not DICOM series.

    ``cases``: the inputs as ``input_cases`` found them (read from ``inputs`` when not given).
    "nifti" means the label map image, written in the input's format for image files.
    """
    if output_type not in OUTPUT_TYPES:
        raise DiffprobeError(f"--output_type {output_type!r} is not known", fix=f"use one of {', '.join(OUTPUT_TYPES)}")
    if output_type == "nifti":
        return
    if cases is None:
        cases = input_cases(Path(inputs), 1) if inputs is not None else []
    images = [c.images[0] for c in cases if not c.images[0].is_dir()]
    if images:
        where = Path(inputs) if inputs is not None else images[0]
        raise DiffprobeError(
            f"--output_type {output_type} needs a DICOM series as input (a DICOM SEG references the series' "
            f"slices), but {'this is an image file' if where.is_file() else 'this folder holds image files'} "
            f"({images[0].name}{', ...' if len(images) > 1 else ''})", where,
            "pass the folder of the DICOM series the image came from with -i, or drop --output_type "
            "(NIfTI label maps, the default)")


def output_paths(case: Case, output: Path, output_type: str = "nifti") -> list[Path]:
    """The files written for ``case``: the first is the one ``predict`` reports, all are checked by
    ``--continue_prediction``."""
    seg = Path(output) / f"{case.identifier}{DICOM_SEG_ENDING}"
    image = Path(output) / output_name(case)
    return {"nifti": [image], "dicom_seg": [seg], "both": [image, seg]}[output_type]


def model_description(metas: list[dict]) -> str:
    """The trained model in a few words (dataset, pretrained model, head, folds), for the SEG's headers."""
    meta = metas[0]
    folds = ",".join(str(m.get("fold", "?")) for m in metas)
    return f"{meta.get('dataset', '?')} {meta.get('pretrained', '?')}__{meta.get('head', '?')} fold {folds}"


def write_outputs(seg: np.ndarray, geometry: Geometry, case: Case, labels: dict[str, int], out_path: Path,
                  output_type: str = "nifti", model: str = "") -> None:
    """Write ``seg`` (in the input's geometry) as ``out_path`` (from :func:`output_paths`), atomically.

    "both": the image at ``out_path``, then the SEG next to it: ``--continue_prediction`` redoes a case
    whose SEG is missing.
    """
    if output_type == "dicom_seg":
        from diffprobe.io.dicom_seg import write_dicom_seg

        write_dicom_seg(seg, geometry, case.images[0], labels, out_path, model)
        return
    write_image(seg, geometry, out_path)
    if output_type == "both":
        from diffprobe.io.dicom_seg import write_dicom_seg

        write_dicom_seg(seg, geometry, case.images[0], labels, out_path.parent / f"{case.identifier}{DICOM_SEG_ENDING}",
                        model)
