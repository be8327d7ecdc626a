"""Packaging the pair: float16 copies, and a package that notices any kept file changing."""

import json

import torch
from safetensors.torch import load_file, save_file

from worker.training.package import is_packaged, package_pair


def _build(src):
    for part in ("target", "dspark", "dflash"):
        (src / part).mkdir(parents=True)
        save_file({"w": torch.ones(2, 2)}, str(src / part / "model.safetensors"))
        (src / part / "config.json").write_text("{}")
        (src / part / "training.json").write_text(json.dumps({"steps": 1}))
    (src / "dspark" / "sts.json").write_text(json.dumps({"temperatures": [1.0]}))


def test_the_package_is_float16_and_stale_once_sts_is_refitted(tmp_path):
    src, dst = tmp_path / "build", tmp_path / "pair"
    _build(src)
    package_pair(src, dst)
    assert load_file(str(dst / "dspark" / "model.safetensors"))["w"].dtype == torch.float16
    assert is_packaged(src, dst)
    (src / "dspark" / "sts.json").write_text(json.dumps({"temperatures": [1.5]}))
    assert not is_packaged(src, dst)  # a refitted STS must be packaged again
    package_pair(src, dst)
    assert json.loads((dst / "dspark" / "sts.json").read_text())["temperatures"] == [1.5]
    (src / "dflash" / "training.json").write_text(json.dumps({"steps": 2}))
    assert not is_packaged(src, dst)  # so must a retrained model
