"""Small model pairs whose drafter really predicts its target, built in seconds for tests.

A random draft almost never agrees with a random target, so acceptance paths would go
untested. Here the target's greedy choice mostly follows a fixed permutation of the last
token (`next_token`), with its random layers bending it often enough to reject drafts, and
the draft's Markov head encodes the same permutation. Acceptance is then partial: some
blocks fully accepted, some cut early — exactly what losslessness tests need.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from worker.engine.draft_checkpoint import random_dspark_checkpoint, save_dspark_checkpoint
from worker.engine.drafter import DSparkDraft

VOCAB = 32
EOS, MASK = VOCAB - 2, VOCAB - 1


def next_token(x: int) -> int:
    """The permutation the pair is built around (a bijection of 0..VOCAB-3)."""
    return (5 * x + 3) % (VOCAB - 2)


def word_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<eos>": EOS, "<mask>": MASK}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                   mask_token="<mask>")
    fast.save_pretrained(out_dir)
    return fast


def structured_target(out_dir: Path, family: str = "qwen3", *, bend: float = 0.6,
                      sharpness: float = 4.0, seed: int = 0):
    """A target whose argmax mostly is `next_token(last)`, bent by its layers (`bend`);
    `sharpness` scales how peaked its distribution is (sampling tests want it soft)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=EOS,
              initializer_range=0.02 * bend * 10)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=12, **kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(0.2)
        emb[:, :VOCAB] += 3.0 * torch.eye(VOCAB)
        head = model.get_output_embeddings().weight
        head.mul_(0.5)
        for x in range(VOCAB - 2):
            head[next_token(x), x] += sharpness
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    model.save_pretrained(out_dir)
    word_tokenizer(out_dir)
    return out_dir


def structured_draft(out_dir: Path, target, *, head_type: str = "vanilla", rank: int = VOCAB,
                     gamma: int = 4, confidence: bool = True, seed: int = 0):
    """A DSpark draft whose Markov head proposes `next_token(previous)`."""
    random_dspark_checkpoint(target.config, out_dir, head_type=head_type, markov_rank=rank,
                             gamma=gamma, confidence=confidence, mask_token_id=MASK, seed=seed,
                             target_model=target, num_layers=1)
    if rank == 0:
        return out_dir
    import json
    cfg = json.loads((Path(out_dir) / "config.json").read_text())
    draft = DSparkDraft.from_pretrained(out_dir, target.config, device=torch.device("cpu"),
                                        dtype=torch.float32)
    head = draft.markov_head
    with torch.no_grad():
        head.markov_w1.weight.zero_()
        head.markov_w1.weight[:, :VOCAB] = torch.eye(VOCAB)[:, :rank]
        head.markov_w2.weight.zero_()
        for x in range(VOCAB - 2):
            head.markov_w2.weight[next_token(x), x] = 6.0
        if confidence:  # a confident drafter, so threshold/prefix policies verify drafts
            draft.confidence_head.proj.bias.fill_(3.0)
        if head_type == "rnn":
            r = rank
            head.joint_proj.weight[2 * r:].zero_()
            head.joint_proj.bias[2 * r:].zero_()
            head.joint_proj.weight[2 * r:, r:2 * r] = 3.0 * torch.eye(r)
    save_dspark_checkpoint(draft, cfg, out_dir)
    return out_dir
