"""Settings of the semi-supervised baselines (`dusss.methods.baselines`), one dataclass per method, nested in
`SegMethodConfig` as `semi.<method>.*` (e.g. `--set semi.uamt.passes=8`). Defaults are each paper's setting;
each field says where it comes from. Lower layer: imports only `dusss.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dusss.config import check_fields


@dataclass
class UAMTConfig:
    """UA-MT (Yu et al., MICCAI 2019)."""

    def __post_init__(self) -> None:
        check_fields(self, "semi.uamt")


@dataclass
class UCMTConfig:
    """UCMT (Shen et al., IJCAI 2023)."""

    def __post_init__(self) -> None:
        check_fields(self, "semi.ucmt")


@dataclass
class CCTConfig:
    """CCT (Ouali et al., CVPR 2020)."""

    def __post_init__(self) -> None:
        check_fields(self, "semi.cct")


@dataclass
class MCNetConfig:
    """MC-Net (Wu et al., MICCAI 2021)."""

    def __post_init__(self) -> None:
        check_fields(self, "semi.mcnet")


@dataclass
class SSNetConfig:
    """SS-Net (Wu et al., MICCAI 2022)."""

    def __post_init__(self) -> None:
        check_fields(self, "semi.ssnet")


@dataclass
class CPSConfig:
    """CPS (Chen et al., CVPR 2021)."""

    def __post_init__(self) -> None:
        check_fields(self, "semi.cps")


@dataclass
class BCPConfig:
    """BCP (Bai et al., CVPR 2023)."""

    def __post_init__(self) -> None:
        check_fields(self, "semi.bcp")


__all__ = ["BCPConfig", "CCTConfig", "CPSConfig", "MCNetConfig", "SSNetConfig", "UAMTConfig", "UCMTConfig"]
