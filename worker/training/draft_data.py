"""The drafter's training data, answered by the target itself (docs/DSPARK.md 4).

For each prompt the target writes a continuation with the engine's batched `ar` mode. One plain
Hugging Face forward over prompt + continuation then records, at every position, the context
features the drafter reads (the hidden states of `target_layer_ids`, concatenated; -1 = the
embedding output) and the target's final normed hidden state. Only continuation tokens are
labels (the loss mask), like the answers of a chat data set.

Why the final hidden state and not the logits: the drafter's `lm_head` is a frozen copy of the
target's, so `lm_head(final hidden)` recovers the target's full next-token logits at training
time, exact up to the float16 rounding of its input, for 2·d bytes a position (512 B at
d = 256). Full float16 logits would take 2·V bytes (16 KB at V = 8192, 8 MB per 512-token
sequence), and top-k logits bias the L1 term by the mass they drop.

Why temperature 1 by default: the L1 term teaches the target's T = 1 distribution at every
position whatever the data's temperature, and sampled answers show the drafter the contexts a
T = 1 server meets rather than only the greedy path (into which a small target's greedy answers
also fall as repetition loops). Greedy data (temperature 0) suits a drafter served only at T = 0.

Shards of `seqs_per_shard` sequences, packed without padding, are written with `torch.save`
and listed in `manifest.json` as they finish; a rerun with the same settings skips them.

Knows: the engine's public API, the target's Hugging Face forward, files. Does not know: where
prompts come from (the corpus), the drafter's model or its training (`draft_train`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from worker.engine.config import EngineConfig, SamplingParams
from worker.engine.engine import LLMEngine
from worker.engine.model_runner import load_target, load_tokenizer

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DraftDataConfig:
    """How the data is made; all of it must match for a rerun to reuse finished shards."""

    target_layer_ids: tuple[int, ...]
    """Target layers whose hidden states are the context features (-1 = embeddings)."""
    max_new_tokens: int = 256
    """Most tokens the target writes per prompt (fewer when it emits EOS)."""
    temperature: float = 1.0
    """Sampling temperature of the answers; 0 = greedy (see the module docstring)."""
    seed: int = 0
    """Prompt i is answered with the engine seed derived from (seed, i)."""
    seqs_per_shard: int = 64
    """Sequences per shard file, the unit of resumption."""
    gen_batch_size: int = 32
    """Requests the engine decodes at once."""
    record_batch_size: int = 8
    """Sequences per recording forward (right-padded)."""

    def __post_init__(self):
        object.__setattr__(self, "target_layer_ids", tuple(self.target_layer_ids))
        for name in ("max_new_tokens", "seqs_per_shard", "gen_batch_size", "record_batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature: expected a number in [0, 100], "
                             f"got {self.temperature!r}")
        if not self.target_layer_ids:
            raise ValueError("target_layer_ids: expected at least one layer id")


@dataclass
class DraftBatch:
    """Sequences padded to the longest; the contract between data and training forward."""

    input_ids: torch.Tensor  # [B, S] long, 0 past each length
    loss_mask: torch.Tensor  # [B, S] bool: the token is a continuation token (a label)
    lengths: torch.Tensor  # [B] long
    features: torch.Tensor  # [B, S, n*d] float32 context features, 0 past each length
    target_hidden: torch.Tensor  # [B, S, d] float32 target's final normed hidden state


def build_draft_data(target_dir: str | Path, prompts: Sequence[str | list[int]],
                     out_dir: str | Path, config: DraftDataConfig, *,
                     device: str = "cpu") -> Path:
    """Answer `prompts` with the target and record shards into `out_dir`; returns `out_dir`.

    Prompts are strings (tokenized with the target's tokenizer) or token id lists.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(target_dir))
    prompt_ids = [list(p) if not isinstance(p, str) else tokenizer(p).input_ids for p in prompts]
    if not prompt_ids or any(not p for p in prompt_ids):
        raise ValueError("prompts: expected at least one prompt, none of them empty")
    target = load_target(str(target_dir), device=torch.device(device), dtype=torch.float32)
    manifest = _open_manifest(out, config, target.config, prompt_ids)
    done = {s["index"] for s in manifest["shards"]}
    if len(done) == manifest["num_shards"]:
        return out
    longest = max(len(p) for p in prompt_ids) + config.max_new_tokens
    engine = LLMEngine(EngineConfig(device=device, dtype="float32", policy="ar", profile_sps=False,
                                    max_num_seqs=config.gen_batch_size,
                                    max_batch_tokens=max(512, config.gen_batch_size),
                                    kv_budget_tokens=max(65536, config.gen_batch_size * longest)),
                       target, tokenizer)
    size = config.seqs_per_shard
    num_shards = -(-len(prompt_ids) // size)
    finished = sum(s["num_seqs"] for s in manifest["shards"])
    with tqdm(total=len(prompt_ids), initial=finished, desc="draft data", unit="seq") as bar:
        for index in range(num_shards):
            if index in done:
                continue
            lo, hi = index * size, min(len(prompt_ids), (index + 1) * size)
            answers = _answer(engine, prompt_ids[lo:hi], lo, config)
            shard = _record(target, [(prompt_ids[lo + i], a) for i, a in enumerate(answers)],
                            config)
            name = f"shard_{index:05d}.pt"
            _atomic_save(shard, out / name)
            manifest["shards"].append({"index": index, "file": name, "num_seqs": hi - lo,
                                       "num_tokens": int(shard["offsets"][-1])})
            _write_json(out / MANIFEST_NAME, manifest)
            bar.update(hi - lo)
    return out


def _answer(engine: LLMEngine, prompts: list[list[int]], first_index: int,
            config: DraftDataConfig) -> list[list[int]]:
    """The target's continuations (EOS included when it stopped there), seeded per prompt."""
    params = [SamplingParams(temperature=config.temperature, max_tokens=config.max_new_tokens,
                             seed=(config.seed * 1_000_003 + first_index + i) % 2**63)
              for i in range(len(prompts))]
    return [r["token_ids"] for r in engine.generate(prompts, params, policy="ar")]


@torch.inference_mode()
def _record(target, seqs: list[tuple[list[int], list[int]]], config: DraftDataConfig) -> dict:
    """One right-padded forward per `record_batch_size` sequences -> one packed shard."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in
                                            ("input_ids", "loss_mask", "features", "target_hidden")}
    for start in range(0, len(seqs), config.record_batch_size):
        chunk = seqs[start:start + config.record_batch_size]
        lengths = [len(p) + len(c) for p, c in chunk]
        ids = torch.zeros(len(chunk), max(lengths), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for b, (p, c) in enumerate(chunk):
            ids[b, :lengths[b]] = torch.tensor(p + c)
            attention[b, :lengths[b]] = 1
        out = target.model(input_ids=ids.to(target.device),
                           attention_mask=attention.to(target.device),
                           output_hidden_states=True, use_cache=False)
        # hidden_states[i + 1] is layer i's output, [0] the embeddings; the last is normed
        feats = torch.cat([out.hidden_states[i + 1] for i in config.target_layer_ids], dim=-1)
        for b, (p, _c) in enumerate(chunk):
            n = lengths[b]
            parts["input_ids"].append(ids[b, :n].to(torch.int32))
            parts["loss_mask"].append(torch.arange(n) >= len(p))
            parts["features"].append(_half(feats[b, :n], "context features"))
            parts["target_hidden"].append(_half(out.last_hidden_state[b, :n], "final hidden"))
    shard = {k: torch.cat(v) for k, v in parts.items()}
    shard["offsets"] = torch.tensor([0] + [len(p) + len(c) for p, c in seqs]).cumsum(0)
    return shard


def _half(x: torch.Tensor, what: str) -> torch.Tensor:
    y = x.to(torch.float16).cpu()
    if not torch.isfinite(y).all():
        raise ValueError(f"the target's {what} overflow float16 (max |x| = "
                         f"{x.abs().max().item():.3g}); this data format cannot hold them")
    return y


class DraftDataset:
    """Finished data directories (one, or several answered differently, e.g. sampled and
    greedy): shards loaded memory-mapped, sequences by global index across all of them."""

    def __init__(self, data_dirs: str | Path | Sequence[str | Path]):
        dirs = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs)
        if not dirs:
            raise ValueError("data_dirs: expected at least one data directory")
        self.dirs = [Path(d) for d in dirs]
        self.manifests = [_finished_manifest(d) for d in self.dirs]
        self.manifest = self.manifests[0]
        for d, m in zip(self.dirs[1:], self.manifests[1:]):
            if (m["target"], m["config"]["target_layer_ids"]) != (
                    self.manifest["target"], self.manifest["config"]["target_layer_ids"]):
                raise ValueError(f"{d}: recorded from another target or other layers than "
                                 f"{self.dirs[0]}; data directories must match to be combined")
        self._shards, self._where = [], []
        for d, m in zip(self.dirs, self.manifests):
            for s in sorted(m["shards"], key=lambda s: s["index"]):
                self._shards.append(torch.load(d / s["file"], mmap=True, weights_only=True))
                self._where += [(len(self._shards) - 1, j) for j in range(s["num_seqs"])]

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return tuple(self.manifest["config"]["target_layer_ids"])

    def __len__(self) -> int:
        return len(self._where)

    def answer_token_counts(self, vocab_size: int) -> torch.Tensor:
        """[V] how often the target wrote each token in its answers (the loss-masked part)."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for shard in self._shards:
            counts += torch.bincount(shard["input_ids"][shard["loss_mask"]].long(),
                                     minlength=vocab_size)
        return counts

    def check_fits(self, target_config) -> None:
        """Refuse a target other than the one the data was recorded from (by shape)."""
        expected = self.manifest["target"]
        actual = _target_shape(target_config)
        if actual != expected:
            raise ValueError(f"{self.dirs[0]}: the data was recorded from a target with "
                             f"{expected}, but this target has {actual}")

    def batch(self, indices: Sequence[int]) -> DraftBatch:
        """The sequences `indices`, padded to the longest."""
        seqs = []
        for index in indices:
            shard_i, j = self._where[index]
            shard = self._shards[shard_i]
            lo, hi = int(shard["offsets"][j]), int(shard["offsets"][j + 1])
            seqs.append({k: shard[k][lo:hi] for k in
                         ("input_ids", "loss_mask", "features", "target_hidden")})
        lengths = torch.tensor([s["input_ids"].shape[0] for s in seqs])
        width = int(lengths.max())

        def pad(key, dtype):
            first = seqs[0][key]
            out = torch.zeros((len(seqs), width) + first.shape[1:], dtype=dtype)
            for b, s in enumerate(seqs):
                out[b, :s[key].shape[0]] = s[key]
            return out

        return DraftBatch(pad("input_ids", torch.long), pad("loss_mask", torch.bool), lengths,
                          pad("features", torch.float32), pad("target_hidden", torch.float32))


def _finished_manifest(data_dir: Path) -> dict:
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; build the data with build_draft_data first")
    manifest = json.loads(path.read_text())
    if sum(s["num_seqs"] for s in manifest["shards"]) != manifest["num_prompts"]:
        raise ValueError(f"{data_dir}: the data is unfinished ({len(manifest['shards'])} shards of "
                         f"{manifest['num_shards']}); rerun build_draft_data to complete it")
    return manifest


def _open_manifest(out: Path, config: DraftDataConfig, target_config, prompt_ids) -> dict:
    """The existing manifest when it was made with the same settings, else a fresh one."""
    fresh = {"version": FORMAT_VERSION, "config": asdict(config),
             "target": _target_shape(target_config),
             "prompts_sha256": hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest(),
             "num_prompts": len(prompt_ids),
             "num_shards": -(-len(prompt_ids) // config.seqs_per_shard), "shards": []}
    fresh = json.loads(json.dumps(fresh))  # tuples -> lists, as they come back from disk
    path = out / MANIFEST_NAME
    if not path.exists():
        _write_json(path, fresh)
        return fresh
    old = json.loads(path.read_text())
    changed = sorted(k for k in fresh if k != "shards" and old.get(k) != fresh[k])
    if changed:
        raise ValueError(f"{out}: holds draft data made with other settings ({', '.join(changed)} "
                         "differ); use a fresh directory or the original settings")
    return old


def _target_shape(c) -> dict:
    return {"model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
