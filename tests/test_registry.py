"""The one registry idiom: entries by name, duplicates refused, unknown names reported with the known ones;
every name-chosen part of a config (methods, objectives, encoders, readers) is one of these registries."""

from __future__ import annotations

import pytest

from dusss.data.readers import READERS, known_extensions
from dusss.errors import ConfigError
from dusss.methods.pretrain import PRETRAIN_METHODS, build_pretrain_objective
from dusss.methods.segmentation import SEG_METHODS
from dusss.models.image_encoders import IMAGE_ENCODERS, ImageEncoderConfig
from dusss.models.text_encoders import TEXT_ENCODERS, TextEncoderConfig
from dusss.registry import Registry


def test_registry_adds_looks_up_and_refuses_duplicates() -> None:
    reg: Registry[int] = Registry("thing")
    assert reg.register("b")(2) == 2
    reg.add("a", 1)
    assert reg.names() == ["a", "b"] and dict(reg) == {"b": 2, "a": 1} and len(reg) == 2 and "a" in reg
    assert reg.lookup("a") == 1 and reg["b"] == 2 and reg.get("zzz") is None
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.add("a", 3)
    with pytest.raises(ConfigError, match=r"unknown thing 'c'; choose from \['a', 'b'\]"):
        reg.lookup("c")
    reg.remove("a")
    reg.remove("a")  # absent: no error
    assert reg.names() == ["b"]


def test_the_package_registries_hold_what_the_configs_accept() -> None:
    from dusss.methods.baselines import load_all

    # the core methods, and one baseline per module of dusss.methods.baselines, named after its module
    assert SEG_METHODS.names() == sorted(["amvlm", "dusss", "mt", "supervised", "unimatch", *load_all()])
    assert {"bcp", "cct", "cps", "mcnet", "ssnet"} <= set(SEG_METHODS)
    assert all(SEG_METHODS[n].name == n for n in SEG_METHODS)
    assert PRETRAIN_METHODS.names() == ["amvlm", "clip", "dusss"]
    assert IMAGE_ENCODERS.names() == ["efficientnet_lite0", "vit"]
    assert TEXT_ENCODERS.names() == ["hf", "minilm"]
    assert known_extensions() == READERS.names() and ".nii.gz" in READERS
    with pytest.raises(ConfigError, match=r"image.kind: 'resnet' is not one of \['efficientnet_lite0', 'vit'\]"):
        ImageEncoderConfig(kind="resnet")
    with pytest.raises(ConfigError, match=r"text.kind: 'gpt' is not one of \['hf', 'minilm'\]"):
        TextEncoderConfig(kind="gpt")
    with pytest.raises(ConfigError, match=r"unknown pre-training method 'simclr'; choose from"):
        build_pretrain_objective("simclr")


def test_plugins_are_imported_on_the_first_read_only(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from dusss.registry import Registry

    reg: Registry[int] = Registry("number", plugins=("dusss_test_plugin",))
    (tmp_path / "dusss_test_plugin.py").write_text("import sys\nsys.modules['__reg__'].add('two', 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys
    import types

    holder = types.ModuleType("__reg__")
    holder.add = reg.add  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__reg__", holder)
    reg.add("one", 1)
    assert "dusss_test_plugin" not in sys.modules  # nothing imported yet
    assert reg.names() == ["one", "two"] and reg.lookup("two") == 2  # the first read imported the plugin
    monkeypatch.delitem(sys.modules, "dusss_test_plugin")
