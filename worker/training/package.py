"""The pipeline's last stage: the finished pair, stored in float16, where the package ships it.

Float16 halves the size (the pair must fit 60 MB) and keeps 10 mantissa bits; models load it
into any dtype. Every file is written into a scratch directory that replaces the destination
only when complete.

Knows: which files make up the pair. Does not know: how any of it was trained.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

MARKER = "pair.json"
# What a serving engine needs from each directory of the pair.
KEEP = {
    "target": ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "training.json"),
    "dspark": ("config.json", "sts.json", "training.json", "draft_vocab.json"),
    "dflash": ("config.json", "training.json", "draft_vocab.json"),
}


def package_pair(src: Path, dst: Path) -> dict:
    """Copy target, DSpark and DFlash from `src` (a build_pair directory) into `dst`."""
    scratch = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    sizes = {}
    for part, names in KEEP.items():
        (scratch / part).mkdir(parents=True)
        for name in names:
            if (src / part / name).exists():
                shutil.copy2(src / part / name, scratch / part / name)
        weights = [p for p in sorted((src / part).glob("*.safetensors"))]
        if not weights:
            raise FileNotFoundError(f"{src / part} holds no safetensors weights")
        tensors = {}
        for path in weights:
            tensors.update(load_file(path))
        half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file({k: v.contiguous() for k, v in half.items()},
                  scratch / part / "model.safetensors", metadata={"format": "pt"})
        sizes[part] = sum(f.stat().st_size for f in (scratch / part).iterdir())
    summary = {"bytes": sizes, "total_mb": round(sum(sizes.values()) / 1e6, 1)}
    (scratch / MARKER).write_text(json.dumps({**summary, "source": _source_id(src)}, indent=1))
    shutil.rmtree(dst, ignore_errors=True)
    scratch.rename(dst)
    return summary


def is_packaged(src: Path, dst: Path) -> bool:
    """True when `dst` holds the pair packaged from `src` as it is now."""
    marker = dst / MARKER
    return marker.exists() and json.loads(marker.read_text()).get("source") == _source_id(src)


def _source_id(src: Path) -> dict:
    """The training summaries of the pair's three models (they change whenever one is
    retrained) and a digest of every other file kept from them (STS refitted, say)."""
    ident = {part: json.loads((src / part / "training.json").read_text())
             for part in KEEP if (src / part / "training.json").exists()}
    digests = {f"{part}/{name}": hashlib.sha256((src / part / name).read_bytes()).hexdigest()[:16]
               for part, names in KEEP.items() for name in names
               if name != "training.json" and (src / part / name).exists()}
    return {**ident, "files": digests}
