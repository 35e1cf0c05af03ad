"""diffprobe: 3D CT segmentation from diffusion-pretrained features.

Pipeline stages (data flows one way): raw -> fingerprint -> plans -> preprocessed
-> BPR -> diffusion checkpoint -> features -> probe -> predictions -> metrics.
Each stage is a module with a plain Python API; ``diffprobe.cli`` is a thin layer.
"""

__version__ = "0.1.0"
