"""dusss: text-guided semi-supervised medical image segmentation (DuSSS, AMVLM)."""

__version__ = "0.1.0"
