"""The semi-supervised baselines of the DuSSS paper's Table 1, each in its own module of this package,
registered in `dusss.methods.segmentation.SEG_METHODS` when the registry is first read (every module here is
imported then). Each shares the U-Net, the loop, the perturbations (`dusss.methods.perturb`) and the schedule;
one with extra trainable modules keeps them in `self.heads`; its settings are `semi.<name>.*`
(`dusss.methods.baseline_config`).
"""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> list[str]:
    """Import every baseline module of this package (each registers its method); returns their names."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


load_all()
