"""SNOMED CT concepts for the segments of a DICOM Segmentation, looked up from dataset.json label names.

Why a table: a DICOM SEG segment must carry a coded category and type; viewers (3D Slicer's
terminology, OHIF, PACS queries) use the codes, not the free-text label, to know what a segment is.
The codes follow DICOM's CID 7150/7151 and the convention of dcmqi, 3D Slicer and TotalSegmentator's
DICOM export: category "Anatomical Structure" (SCT 123037004), a body-structure type and, for paired
organs, the laterality as a type *modifier* (SCT 24028007 Right / 7771000 Left) rather than a
pre-coordinated "right kidney" code. Names not in the table get 3D Slicer's generic
"Tissue"/"Tissue" (SCT 85756007) and keep their dataset.json name as the segment label.

Lookup is forgiving about spelling: ``kidney_right``, ``right_kidney`` and ``Right Kidney`` map to
the same concept (word order, case and separators do not matter); only the whole words "left" and
"right" are read as laterality (``kidney_R`` is not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCT = "SCT"


@dataclass(frozen=True)
class Concept:
    """One coded concept: (code value, coding scheme designator, code meaning)."""

    value: str
    meaning: str
    scheme: str = SCT


ANATOMICAL_STRUCTURE = Concept("123037004", "Anatomical Structure")
TISSUE = Concept("85756007", "Tissue")
RIGHT = Concept("24028007", "Right")
LEFT = Concept("7771000", "Left")


@dataclass(frozen=True)
class SegmentCodes:
    """Category, type and optional laterality modifier of one segment."""

    category: Concept
    type: Concept
    modifier: Concept | None = None

    @property
    def generic(self) -> bool:
        """True when the name was not in the table (generic Tissue/Tissue concept)."""
        return self.type == TISSUE


GENERIC = SegmentCodes(TISSUE, TISSUE)

# (type concept, paired organ: may take a left/right modifier, spellings)
_STRUCTURES: list[tuple[Concept, bool, tuple[str, ...]]] = [
    (Concept("78961009", "Spleen"), False, ("spleen",)),
    (Concept("64033007", "Kidney"), True, ("kidney",)),
    (Concept("28231008", "Gallbladder"), False, ("gallbladder", "gall bladder")),
    (Concept("32849002", "Esophagus"), False, ("esophagus", "oesophagus")),
    (Concept("10200004", "Liver"), False, ("liver",)),
    (Concept("69695003", "Stomach"), False, ("stomach",)),
    (Concept("15825003", "Aorta"), False, ("aorta",)),
    (Concept("64131007", "Inferior vena cava"), False, ("inferior vena cava", "ivc", "postcava")),
    (Concept("110765007", "Portal vein and splenic vein"), False,
     ("portal vein and splenic vein", "portal and splenic vein", "portal splenic vein")),
    (Concept("32764006", "Portal vein"), False, ("portal vein",)),
    (Concept("35819009", "Splenic vein"), False, ("splenic vein",)),
    (Concept("15776009", "Pancreas"), False, ("pancreas",)),
    (Concept("23451007", "Adrenal gland"), True, ("adrenal gland", "adrenal", "suprarenal gland")),
    (Concept("38848004", "Duodenum"), False, ("duodenum",)),
    (Concept("30315005", "Small intestine"), False, ("small intestine", "small bowel")),
    (Concept("71854001", "Colon"), False, ("colon",)),
    (Concept("89837001", "Urinary bladder"), False, ("urinary bladder", "bladder")),
    (Concept("41216001", "Prostate"), False, ("prostate",)),
    (Concept("39607008", "Lung"), True, ("lung",)),
    (Concept("80891009", "Heart"), False, ("heart",)),
    (Concept("44567001", "Trachea"), False, ("trachea",)),
    (Concept("2748008", "Spinal cord"), False, ("spinal cord",)),
]

_LATERALITY = {"right": RIGHT, "left": LEFT}


def _words(name: str) -> list[str]:
    """Lower-case words of a label name; ``_``, ``-``, spaces and case changes separate them."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


_TABLE: dict[frozenset[str], tuple[Concept, bool]] = {
    frozenset(_words(spelling)): (concept, paired)
    for concept, paired, spellings in _STRUCTURES for spelling in spellings
}


def segment_codes(name: str) -> SegmentCodes:
    """The coded concepts for a dataset.json label name (generic Tissue when unknown).

    A laterality word is only read as a modifier for paired organs: "liver_left" (a lobe) is not
    the liver, so it gets the generic concept instead of a wrong "Liver, Left".
    """
    words = _words(name)
    sides = [w for w in words if w in _LATERALITY]
    rest = frozenset(w for w in words if w not in _LATERALITY)
    found = _TABLE.get(rest)
    if found is None or len(sides) > 1 or (sides and not found[1]):
        return GENERIC
    concept, _ = found
    return SegmentCodes(ANATOMICAL_STRUCTURE, concept, _LATERALITY[sides[0]] if sides else None)
