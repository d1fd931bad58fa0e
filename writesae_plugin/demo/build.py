"""``writesae make-demo-model``: tokenizer + small Qwen3.5 model trained on the stdlib corpus, reproducibly.

Writes ``out/``: HF model (config + safetensors), tokenizer, ``recipe.json`` (every setting, the corpus
split sizes, the final validation loss and the unigram baseline) and ``eval_tokens.safetensors`` (the fixed
validation contexts the recorded loss was computed on).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import corpus

EOS = "<|endoftext|>"


@dataclass
class TrainingRecipe:
    """Settings shared by every demo architecture: tokenizer, data, optimiser, evaluation."""

    vocab_size: int = 4096
    tokenizer_chars: int = 6_000_000
    train_chars: int = 14_000_000
    context_length: int = 256
    batch_size: int = 16
    steps: int = 900
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.05
    bf16_autocast: bool = True
    eval_contexts: int = 48
    seed: int = 0


@dataclass
class DemoRecipe(TrainingRecipe):
    """The shipped Gated DeltaNet demo: a Qwen3.5 text model, 5 GDN layers and one attention layer."""

    arch: str = "qwen3_5"
    hidden_size: int = 256
    intermediate_size: int = 512
    layer_types: tuple[str, ...] = ("linear_attention", "linear_attention", "linear_attention", "full_attention",
                                    "linear_attention", "linear_attention")
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64


@dataclass
class Mamba2DemoRecipe(TrainingRecipe):
    """The shipped Mamba-2 demo: 8 Mamba-2 layers, 16 heads of head_dim 32, d_state 32 (so each head's state
    is 32 x 32, as the GDN demo's), about the GDN demo's parameter count, same corpus, steps and data order."""

    arch: str = "mamba2"
    hidden_size: int = 256
    num_hidden_layers: int = 8
    expand: int = 2
    mamba_head_dim: int = 32
    state_size: int = 32
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64


ARCHS = {"qwen3_5": DemoRecipe, "mamba2": Mamba2DemoRecipe}


def train_tokenizer(recipe: DemoRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.texts("train", recipe.tokenizer_chars), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, model_max_length=1 << 20)


def token_stream(tokenizer, split: str, max_chars: int | None) -> torch.Tensor:
    """All texts of a split, tokenized and joined with EOS: a 1-D long tensor."""
    ids: list[int] = []
    batch = list(corpus.texts(split, max_chars))
    for enc in tokenizer(batch, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def eval_contexts(stream: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """``n`` non-overlapping contexts spread evenly over the stream."""
    starts = torch.linspace(0, len(stream) - T - 1, n).long()
    return torch.stack([stream[s:s + T] for s in starts])


def unigram_loss(train: torch.Tensor, evals: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of an add-one unigram model fitted on ``train`` on the predicted tokens
    of ``evals`` (every position but the first of each context)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[evals[:, 1:]].mean())


@torch.no_grad()
def mean_loss(model, contexts: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token loss (nats/token) of ``model`` over ``contexts`` in fp32."""
    tot, n = 0.0, 0
    for i in range(0, len(contexts), batch):
        x = contexts[i:i + batch]
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        tot += float(nll)
        n += x[:, 1:].numel()
    return tot / n


def build_config(recipe: TrainingRecipe, tokenizer):
    """The HF config of the recipe's architecture (random init; trained by :func:`make_demo_model`)."""
    if isinstance(recipe, Mamba2DemoRecipe):
        from transformers import Mamba2Config

        d_inner = recipe.expand * recipe.hidden_size
        return Mamba2Config(
            vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_hidden_layers,
            expand=recipe.expand, head_dim=recipe.mamba_head_dim, num_heads=d_inner // recipe.mamba_head_dim,
            state_size=recipe.state_size, n_groups=recipe.n_groups, conv_kernel=recipe.conv_kernel,
            chunk_size=recipe.chunk_size, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if not isinstance(recipe, DemoRecipe):
        raise TypeError(f"unknown demo recipe {type(recipe).__name__}; expected one of {sorted(ARCHS)}")
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=len(recipe.layer_types), layer_types=list(recipe.layer_types),
        num_attention_heads=recipe.num_attention_heads, num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim, linear_key_head_dim=recipe.linear_key_head_dim,
        linear_value_head_dim=recipe.linear_value_head_dim, linear_num_key_heads=recipe.linear_num_key_heads,
        linear_num_value_heads=recipe.linear_num_value_heads, max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None)


def build_model(recipe: TrainingRecipe, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(build_config(recipe, tokenizer))


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_demo_model(out_dir: str | Path, recipe: TrainingRecipe | None = None, progress: bool = True,
                    tokenizer_dir: str | Path | None = None) -> dict:
    """Build (or reuse, from ``tokenizer_dir``) the tokenizer and train the model; returns the recorded recipe.

    Reusing the GDN demo's tokenizer gives every demo model the same vocabulary, so the cross-architecture
    comparison runs on identical token ids."""
    from transformers import AutoTokenizer

    recipe = recipe or DemoRecipe()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    t_start = time.time()
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if len(tokenizer) != recipe.vocab_size:
            raise ValueError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens, the recipe asks for "
                             f"{recipe.vocab_size}")
    else:
        tokenizer = train_tokenizer(recipe)
    train = token_stream(tokenizer, "train", recipe.train_chars)
    val = token_stream(tokenizer, "validation", None)
    evals = eval_contexts(val, recipe.eval_contexts, recipe.context_length)
    model = build_model(recipe, tokenizer).float()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps)) * 0.9 + 0.1 * min(1.0, (s + 1) / recipe.warmup))
    g = torch.Generator().manual_seed(recipe.seed)
    T, B = recipe.context_length, recipe.batch_size
    autocast = recipe.bf16_autocast and torch.amp.autocast_mode.is_autocast_available("cpu")
    log = []
    bar = tqdm(range(recipe.steps), desc="training demo model", disable=not progress)
    model.train()
    for step in bar:
        starts = torch.randint(0, len(train) - T - 1, (B,), generator=g)
        x = torch.stack([train[s:s + T] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.append({"step": step, "train_loss": loss.item()})
    model.eval()
    val_loss = mean_loss(model, evals)
    baseline = unigram_loss(train, evals, len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from safetensors.torch import save_file

    save_file({"input_ids": evals.contiguous()}, str(out / "eval_tokens.safetensors"))
    record = {"arch": recipe.arch, "recipe": asdict(recipe),
              "tokenizer": {"from": None if tokenizer_dir is None else str(tokenizer_dir),
                            "tokenizer_json_sha256": _file_sha256(out / "tokenizer.json")},
              "n_parameters": n_params, "train_tokens": int(len(train)),
              "validation_tokens": int(len(val)), "eval_contexts": list(evals.shape),
              "validation_loss_nats": val_loss, "unigram_baseline_nats": baseline,
              "corpus": {s: len(corpus.files(s)) for s in corpus.SPLITS}, "python": platform.python_version(),
              "torch": torch.__version__, "bf16_autocast_used": autocast, "seconds": time.time() - t_start,
              "train_log": log}
    (out / "recipe.json").write_text(json.dumps(record, indent=2))
    return record
