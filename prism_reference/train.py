"""The reference MoE: a small Mixtral-layout model that prism trains itself on built-in prose + code, so
quality and runtime figures are measured on a model with learned routing and no download.

Trained with prism's own model code (the Mixtral family's layers, autograd through MoEBlock), next-token
cross-entropy plus the Switch Transformer load-balancing loss (Fedus et al. 2021, as Mixtral's
`load_balancing_loss_func`) and the ST-MoE router z-loss (Zoph et al. 2022); AdamW, linear warmup then
cosine decay, gradient clipping. Deterministic for a seed and thread count: one torch seed for the
initialisation, one generator for the data order. Each preset fixes its thread count (float reductions
split differently across threads give different bits), so a preset is the same model on any machine with
the same torch build; the thread count is part of the cache key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_load.atomic import atomic_folder
from prism_load.errors import PrismError
from prism_load.models.family import family_for
from prism_load.models.model import MoEForCausalLM
from prism_reference.bpe_tokenizer import save_tokenizer
from prism_reference.data import DOMAINS, Corpus, build_corpus, data_fingerprint, eval_windows, sample_batch
from prism_reference.hf_export import mixtral_config, save_mixtral
from prism_reference.measure import mean_loss, routing_summary

TRAINING_VERSION = "2"  # bump when training code changes what a preset produces (invalidates the cache)
AUX_LOSS_COEF = 0.01  # Switch Transformer's alpha; Mixtral's router_aux_loss_coef is 0.02
Z_LOSS_COEF = 1e-3  # ST-MoE


@dataclass(frozen=True)
class Preset:
    name: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    expert_intermediate: int
    vocab_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    code_chars: int | None  # code text trained on (None: the whole standard library)
    tokenizer_code_chars: int  # code text the tokenizer learns merges from, besides all training prose
    eval_windows: int  # windows per domain and split for the final losses
    threads: int  # torch threads to train with: fixed, so the trained bits do not depend on the machine
    prose_weight: float = 0.5  # share of batch rows drawn from prose (the rest from code)

    def digest(self) -> str:
        """Hash of the recipe (threads excluded: the cache key names them on their own)."""
        recipe = {k: v for k, v in asdict(self).items() if k != "threads"}
        return hashlib.blake2b(json.dumps(recipe, sort_keys=True).encode(), digest_size=4).hexdigest()


PRESETS = {
    "tiny": Preset("tiny", layers=2, hidden_size=64, heads=4, kv_heads=2, experts=4, top_k=2,
                   expert_intermediate=128, vocab_size=512, seq_len=64, batch_size=8, steps=60, lr=3e-3,
                   warmup_steps=5, code_chars=150_000, tokenizer_code_chars=50_000, eval_windows=4, threads=1),
    "quick": Preset("quick", layers=4, hidden_size=128, heads=4, kv_heads=2, experts=8, top_k=2,
                    expert_intermediate=256, vocab_size=2048, seq_len=128, batch_size=4, steps=1000, lr=2e-3,
                    warmup_steps=30, code_chars=3_000_000, tokenizer_code_chars=600_000, eval_windows=64,
                    threads=2),
    "full": Preset("full", layers=6, hidden_size=192, heads=4, kv_heads=2, experts=8, top_k=2,
                   expert_intermediate=384, vocab_size=4096, seq_len=256, batch_size=4, steps=820, lr=2e-3,
                   warmup_steps=40, code_chars=None, tokenizer_code_chars=1_500_000, eval_windows=48,
                   threads=1),
}


def preset_by_name(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PrismError(f"unknown reference preset {name!r} (presets: {', '.join(PRESETS)})") from None


# --- model and losses --------------------------------------------------------------------------------

def build_model(config: dict, seed: int) -> MoEForCausalLM:
    """Mixtral layers from the family, initialised as GPT-2 does (normal 0.02, residual outputs scaled by
    1/sqrt(2 x layers)) so the residual stream does not grow with depth."""
    family = family_for(config)
    args = family.parse_config(config)
    torch.manual_seed(seed)
    model = MoEForCausalLM(args, family, [family.build_layer(args, i) for i in range(args.num_hidden_layers)])
    residual_std = 0.02 / math.sqrt(2 * args.num_hidden_layers)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        else:
            residual = name.endswith(("o_proj.weight", "experts.down_proj"))
            torch.nn.init.normal_(p, std=residual_std if residual else 0.02)
    return model


class RouterRecorder:
    """MoEObserver keeping each MoE layer's RouterOutput of the current forward pass (with its graph)."""

    def __init__(self):
        self.routes = []

    def on_route(self, layer_index, x, route):
        self.routes.append(route)

    def on_expert(self, layer_index, expert, x, h, weight):
        pass


def load_balancing_loss(routes, num_experts: int, top_k: int) -> torch.Tensor:
    """E x sum_e f_e x P_e per layer, averaged over layers: f_e the share of top-k assignments that go to
    expert e (no gradient), P_e its mean router probability. Equals 1 when routing is uniform."""
    losses = []
    for route in routes:
        probs = torch.softmax(route.logits.float(), dim=-1)  # [N, E]
        assigned = F.one_hot(route.indices, num_experts).sum(1).float().mean(0) / top_k  # [E]
        losses.append(num_experts * (assigned * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(routes) -> torch.Tensor:
    """Mean squared log-sum-exp of the router logits: keeps logits small so routing stays numerically stable."""
    return torch.stack([torch.logsumexp(r.logits.float(), dim=-1).pow(2).mean() for r in routes]).mean()


def lr_at(step: int, preset: Preset) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < preset.warmup_steps:
        return preset.lr * (step + 1) / preset.warmup_steps
    progress = (step - preset.warmup_steps) / max(1, preset.steps - preset.warmup_steps)
    return preset.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


# --- training ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def train_reference(out: Path, preset: str | Preset = "full", seed: int = 0, progress=None,
                    threads: int | None = None) -> dict:
    """Train a preset and write the checkpoint folder `out` atomically; returns training.json's content."""
    preset = preset if isinstance(preset, Preset) else preset_by_name(preset)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "training.json").is_file():
        raise PrismError(f"{out}: exists and is not a reference model folder (choose a new or empty folder)")
    start = time.perf_counter()
    with _threads(threads or preset.threads) as n_threads:
        corpus = build_corpus(seed, preset.vocab_size, preset.code_chars, preset.tokenizer_code_chars,
                              heldout_tokens=preset.eval_windows * (preset.seq_len + 1))
        for domain, stream in corpus.train.items():
            if len(stream) <= preset.seq_len:
                raise PrismError(f"reference preset {preset.name!r}: only {len(stream)} {domain} tokens to "
                                 f"train on, fewer than one window of {preset.seq_len + 1}")
        config = _config(preset, corpus)
        model = build_model(config, seed)
        curve, tokens_seen, train_seconds = _train_loop(model, corpus, preset, seed, progress)
        model.eval()
        report = _report(model, corpus, preset, seed, curve, tokens_seen, train_seconds, n_threads)
        report["seconds"] = round(time.perf_counter() - start, 1)
        with atomic_folder(out) as tmp:
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            save_mixtral(model, config, tmp)
            save_tokenizer(corpus.tokenizer, tmp, model_max_length=config["max_position_embeddings"])
            (tmp / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _config(preset: Preset, corpus: Corpus) -> dict:
    return mixtral_config(
        vocab_size=corpus.tokenizer.get_vocab_size(), hidden_size=preset.hidden_size, layers=preset.layers,
        heads=preset.heads, kv_heads=preset.kv_heads, experts=preset.experts, top_k=preset.top_k,
        expert_intermediate=preset.expert_intermediate, max_positions=4096, eos_id=corpus.eos_id,
        bos_id=corpus.eos_id, router_aux_loss_coef=AUX_LOSS_COEF,
    )


def _train_loop(model, corpus: Corpus, preset: Preset, seed: int, progress):
    recorder = RouterRecorder()
    for _, block in model.moe_blocks():
        block.observer = recorder
    optimizer = _optimizer(model, preset.lr)
    generator = torch.Generator().manual_seed(seed + 1)
    weights = {"prose": preset.prose_weight, "code": 1.0 - preset.prose_weight}
    params = list(model.parameters())
    curve, tokens_seen, began = [], {d: 0 for d in DOMAINS}, time.perf_counter()
    model.train()
    for step in range(preset.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, preset)
        batch, domains = sample_batch(corpus.train, weights, preset.batch_size, preset.seq_len, generator)
        recorder.routes.clear()
        logits = model(batch[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        aux = load_balancing_loss(recorder.routes, preset.experts, preset.top_k)
        loss = ce + AUX_LOSS_COEF * aux + Z_LOSS_COEF * router_z_loss(recorder.routes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for d in domains:
            tokens_seen[d] += preset.seq_len
        curve.append((round(ce.item(), 4), round(aux.item(), 4)))
        if progress is not None:
            rate = sum(tokens_seen.values()) / (time.perf_counter() - began)
            progress(f"training {preset.name}: loss {ce.item():.3f}, balance {aux.item():.3f}, {rate:,.0f} tokens/s",
                     step + 1, preset.steps)
    for _, block in model.moe_blocks():
        block.observer = None
    return curve, tokens_seen, time.perf_counter() - began


def _report(model, corpus: Corpus, preset: Preset, seed: int, curve, tokens_seen, train_seconds, threads):
    windows = {split: {d: eval_windows(streams[d], preset.seq_len, preset.eval_windows) for d in DOMAINS}
               for split, streams in (("train", corpus.train), ("heldout", corpus.heldout))}
    losses = {split: {d: mean_loss(model, w) for d, w in by_domain.items()} for split, by_domain in windows.items()}
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    tail = [ce for ce, _ in curve[-max(1, len(curve) // 10):]]
    seen = sum(tokens_seen.values())
    return {
        "preset": preset.name,
        "seed": seed,
        "training_version": TRAINING_VERSION,
        "preset_config": asdict(preset),
        "steps": preset.steps,
        "tokens_seen": seen,
        "tokens_seen_by_domain": tokens_seen,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(seen / train_seconds, 1),
        "threads": threads,
        "final_train_loss": round(sum(tail) / len(tail), 4),
        "loss": losses,
        "parameters": {"total": total, "experts": experts},
        "routing_heldout": routing_summary(model, windows["heldout"]),
        "data_tokens": {split: {d: len(s[d]) for d in DOMAINS} for split, s in
                        (("train", corpus.train), ("heldout", corpus.heldout))},
        "data_fingerprint": data_fingerprint(),
        "curve": {"every": 1, "loss": [ce for ce, _ in curve], "balance": [aux for _, aux in curve]},
        "torch": torch.__version__,
    }


# --- cache -------------------------------------------------------------------------------------------

def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("PRISM_CACHE") or Path.home() / ".cache" / "prism")


def cache_key(preset: str, seed: int, threads: int | None = None) -> str:
    p = preset_by_name(preset)
    return f"{p.name}-seed{seed}-threads{threads or p.threads}-v{TRAINING_VERSION}-{p.digest()}-{data_fingerprint()}"


def reference_model(preset: str = "full", seed: int = 0, cache_dir: str | Path | None = None, progress=None,
                    threads: int | None = None) -> Path:
    """The cached reference checkpoint folder for (preset, seed), trained first if absent. Concurrent
    callers wait on a lock file instead of training twice; the folder appears only when complete."""
    folder = cache_root(cache_dir) / "reference" / cache_key(preset, seed, threads)
    if (folder / "training.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "training.json").is_file():
            train_reference(folder, preset, seed, progress, threads)
    return folder
