"""The `prism` command line. Thin: parse options, call the library function of the same name, render.

Heavy modules (torch, transformers-free model code) are imported inside commands so `prism --help` is instant.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import typer
from rich.console import Console

from prism_load import __version__
from prism_load.errors import PrismError

app = typer.Typer(
    name="prism",
    help="Convert sparse MoE checkpoints into mixed-precision .prism containers and run them on small hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"prism {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """prism: spend precision, rank, bandwidth and locality where tokens actually go."""


TOKENIZER_HELP = ("For a checkpoint that ships no tokenizer.json: a tokenizer.json, a SentencePiece tokenizer.model, "
                  "a folder holding one, or a Hub repo id ORG/NAME.")
PRICE_HELP = ("What --bits/--size count: runtime (bytes prism_load's packed form holds in RAM: 3-bit codes held "
              "as 4, 5- and 6-bit as 8) or stored (the container's bytes on disk).")
DATASET_HELP = ("Calibration source: builtin:prose|code|mix, a .txt/.jsonl/.json/.parquet file, or hf:NAME. "
                "Held out for evaluation: 10% of its documents by a hash of their text, or, for a source with "
                "fewer than 200 documents (a text file is cut at blank lines, else at lines), the last 10% of "
                "its token stream.")


def _not_yet(name: str) -> None:
    raise PrismError(f"'prism {name}' is not implemented yet")


def _progress(remaining: bool = False):
    """Progress bars on stderr for the library's progress callback."""
    from prism_convert.cli.render import progress_bars

    return progress_bars(err_console, remaining)


@app.command()
def profile(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder."),
    dataset: str = typer.Option("builtin:mix", "--dataset", "-d", help=DATASET_HELP),
    samples: int = typer.Option(128, "--samples", min=1, help="Number of token sequences."),
    seq_len: int = typer.Option(256, "--seq-len", min=2, help="Tokens per sequence."),
    seed: int = typer.Option(0, "--seed"),
    min_tokens: int = typer.Option(16, "--min-tokens", help="Experts routed fewer tokens are rare (neutral prior)."),
    out: Path = typer.Option(..., "-o", "--out", help="Profile folder to write."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
) -> None:
    """Run calibration data through the model layer by layer and record routing and activation statistics."""
    import prism_convert
    from prism_convert.cli.render import profile_table
    from prism_convert.profiling.routing_report import verdicts

    with _progress() as progress:
        data = prism_convert.profile(model, out=out, dataset=dataset, samples=samples, seq_len=seq_len, seed=seed,
                                     min_tokens=min_tokens, tokenizer=tokenizer, progress=progress)
    console.print(profile_table(data))
    for line in verdicts(data):
        console.print(f"- {line}", highlight=False)
    console.print(f"[dim]{data['tokens']:,} tokens in {data['seconds']:.1f} s "
                  f"({data['tokens_per_second']:,.0f} tokens/s), peak RSS {data['peak_rss_bytes'] / 2**20:,.0f} MiB; "
                  f"wrote {out}/profile.json and {data['heatmap']}[/]")


@app.command()
def shift(
    profile_a: Path = typer.Argument(..., help="Profile folder (for example, calibrated on prose)."),
    profile_b: Path = typer.Argument(..., help="Profile folder of the same model on other data (for example, code)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Routing shift between two profiles of one model: per-layer total-variation distance, hot/cold changes."""
    import json

    from prism_convert.cli.render import shift_table
    from prism_convert.profiling.routing_report import routing_shift
    from prism_load.profile_format import Profile

    a, b = Profile.load(profile_a), Profile.load(profile_b)
    if a.data["model"]["config_sha256"] != b.data["model"]["config_sha256"]:
        raise PrismError(f"{profile_a} and {profile_b} profile different models")
    result = routing_shift(a.data, b.data)
    console.print_json(json.dumps(result)) if as_json else console.print(shift_table(result))


@app.command()
def compress(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder."),
    profile_dir: Path = typer.Option(..., "--profile", "-p", help="Folder written by prism profile."),
    bits: float | None = typer.Option(None, "--bits", help="Average bits per routed-expert weight (e.g. 3.25)."),
    size: str | None = typer.Option(None, "--size", help="Total bytes of all stored tensors (e.g. 12GB)."),
    price: str = typer.Option("runtime", "--price", help=PRICE_HELP),
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="Recipe file or built-in name (default: the family's)."),
    layers: str | None = typer.Option(None, "--layers", help="Layer range a:b for this machine (pack merges ranges)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Layers encoded in parallel."),
    out: Path = typer.Option(..., "-o", "--out", help="Work folder (resumable)."),
) -> None:
    """Measure candidate encodings per expert tensor and allocate a bits-and-rank budget over the model."""
    import prism_convert

    with _progress() as progress:
        result = prism_convert.compress(model, profile=profile_dir, out=out, bits=bits, size=size, price=price, recipe=recipe,
                                        layers=layers, workers=workers, progress=progress)
    if result["plan"] is not None:
        _print_plan(result["plan"], out)
    else:
        console.print(f"layers {result['layers'][0]}–{result['layers'][-1]} of 0–{result['num_layers'] - 1} done in "
                      f"{out}; compress the other ranges, then `prism pack` all work folders together.")


def _budget(bits, size, price="runtime"):
    from prism_convert.allocation.bit_plan import Budget
    from prism_convert.tools.fit import parse_bytes

    return Budget(bits=bits, size_bytes=parse_bytes(size) if size is not None else None, price=price)


def _print_plan(plan, folder: Path) -> None:
    from prism_convert.cli.render import plan_table

    console.print(plan_table(plan))
    if plan.rare_experts:
        rare = [list(k) for k in plan.rare_experts]
        console.print(f"rare experts (neutral prior, still encoded): {rare}", highlight=False)
    plot = folder / "plan.png"
    if plot.is_file():
        console.print(f"[dim]wrote {folder / 'plan.json'} and {plot}[/]")


@app.command()
def pack(
    work_dirs: list[Path] = typer.Argument(..., help="Work folder(s) of prism compress (several --layers ranges merge)."),
    out: Path = typer.Option(..., "-o", "--out", help="Container folder to write (e.g. model.prism)."),
    bits: float | None = typer.Option(None, "--bits", help="Override the budget recorded in the work folder."),
    size: str | None = typer.Option(None, "--size", help="Override the budget recorded in the work folder."),
    price: str | None = typer.Option(None, "--price", help=PRICE_HELP + " Default: the work folder's, or runtime "
                                     "with --bits/--size."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Maximum bytes per expert shard."),
) -> None:
    """Write a sharded .prism container with tier metadata from finished compress work."""
    import prism_convert

    plan = prism_convert.pack(work_dirs, out=out, bits=bits, size=size, shard_size=shard_size, price=price)
    _print_plan(plan, work_dirs[0])
    console.print(f"wrote {out}: {plan.total_bytes / 2**20:,.1f} MiB of tensors, "
                  f"{plan.bits_per_expert_weight:.3f} bits per expert weight")


def _model_path(spec: str, progress=None) -> Path:
    """A checkpoint folder, or `reference:PRESET` for the project's reference model (trained if not cached)."""
    if spec.startswith("reference:"):
        from prism_reference.train import reference_model

        return reference_model(spec.split(":", 1)[1], progress=progress)
    return Path(spec)


@app.command()
def convert(
    model: str = typer.Argument(..., help="Checkpoint folder, or reference:quick / reference:full."),
    out: Path = typer.Option(..., "-o", "--out", help="Container folder to write (e.g. model.prism)."),
    bits: float | None = typer.Option(None, "--bits", help="Average bits per routed-expert weight (e.g. 3.25)."),
    size: str | None = typer.Option(None, "--size", help="Total bytes of all stored tensors (e.g. 12GB)."),
    price: str = typer.Option("runtime", "--price", help=PRICE_HELP),
    dataset: str = typer.Option("builtin:mix", "--dataset", "-d", help=DATASET_HELP),
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="Recipe file or built-in name."),
    samples: int = typer.Option(128, "--samples", min=1),
    seq_len: int = typer.Option(256, "--seq-len", min=2),
    eval_samples: int = typer.Option(16, "--eval-samples", min=0, help="Held-out samples for the quality summary (0: skip); where the held-out split holds fewer, the summary uses those and says so."),
    work: Path | None = typer.Option(None, "--work", help="Folder for intermediate work (default: hidden, beside OUT)."),
    workers: int = typer.Option(1, "--workers", min=1),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
) -> None:
    """profile -> compress -> pack in one go, with one progress display; prints size and quality. Every input
    (model, output, recipe, budget, tokenizer, calibration and held-out text) is checked before any compute."""
    import prism_convert
    from prism_convert.preflight import check_output

    _budget(bits, size, price)  # a bad budget fails before a reference model is trained
    check_output(out, "a .prism container", "manifest.json")  # before a reference model is trained
    with _progress() as progress:
        result = prism_convert.convert(_model_path(model, progress), out=out, bits=bits, size=size, price=price, dataset=dataset,
                                       recipe=recipe, samples=samples, seq_len=seq_len, work=work,
                                       eval_samples=eval_samples, workers=workers, tokenizer=tokenizer,
                                       progress=progress)
    _print_conversion(result)


def _print_conversion(result: dict) -> None:
    from prism_convert.cli.render import plan_table

    plan, quality = result["plan"], result["quality"]
    console.print(plan_table(plan))
    console.print(f"[bold]{result['out']}[/]: {plan.total_bytes / 2**20:,.1f} MiB of tensors, "
                  f"{plan.bits_per_expert_weight:.3f} bits per expert weight", highlight=False)
    if quality:
        console.print(f"held-out quality ({quality['dataset']}, {quality['tokens']:,} tokens): "
                      f"KL(original || packed) = {quality['kl']:.4f} nats/token, perplexity "
                      f"{quality['perplexity_reference']:.2f} -> {quality['perplexity']:.2f}, "
                      f"top-1 agreement {quality['top1_agreement']:.1%}", highlight=False)
        console.print(f"[dim]held out: {quality['heldout']}[/]", highlight=False)
        if "note" in quality:
            console.print(f"[yellow]note:[/] {quality['note']}", highlight=False)


@app.command()
def demo(
    bits: float = typer.Option(3.25, "--bits", help="Average bits per routed-expert weight."),
    preset: str = typer.Option("quick", "--preset", help="Reference model preset: quick (default) or full."),
    out: Path = typer.Option(Path("demo.prism"), "-o", "--out"),
    prompt: str = typer.Option("def fibonacci(n):", "--prompt", "-p"),
) -> None:
    """The main job on the embedded default: train (or reuse) the reference MoE, convert it, load and run it."""
    import prism_convert

    with _progress() as progress:
        model = _model_path(f"reference:{preset}", progress)
        # one per reference model and the folder it lives in (its path is part of a work folder's identity): a new
        # model, or the same one trained again under another PRISM_CACHE, never collides with old work
        where = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:8]
        work = out.parent / f".{out.name}.work" / f"{model.name}-{where}"
        result = prism_convert.convert(model, out=out, bits=bits, samples=64, eval_samples=16, work=work,
                                       progress=progress)
    original = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    _print_conversion(result)
    console.print(f"original checkpoint {original / 2**20:,.1f} MiB (fp32) -> container "
                  f"{sum(f.stat().st_size for f in out.glob('*') if f.is_file()) / 2**20:,.1f} MiB on disk", highlight=False)
    _generate(out, prompt, 48)


@app.command()
def run(
    model: Path = typer.Argument(..., help="Checkpoint folder or .prism container."),
    prompt: str = typer.Option("def fibonacci(n):", "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n", min=1),
    cache: str | None = typer.Option(None, "--cache", help="Expert cache budget: '50%' of every expert's bytes in the form held (packed: about the container's), a size ('512MB'), or 'auto' (the memory this process may still take, container limits included, less a reserve). Default: every expert resident."),
    prefetch: bool | None = typer.Option(None, "--prefetch/--no-prefetch", help="Shadow-router prefetch (with --cache). Default: on for a CUDA device, off on a CPU, where on-demand loads measured faster."),
    lookahead: int = typer.Option(1, "--lookahead", min=1, max=2, help="MoE layers predicted ahead (with --prefetch)."),
    predictor: bool = typer.Option(True, "--predictor/--no-predictor", help="Prefetch with the container's fitted predictors where it has them (else the shadow router everywhere)."),
    numa: bool = typer.Option(False, "--numa", help="Place the hottest experts on the compute's NUMA node (with --cache)."),
    eviction: str = typer.Option("next-use", "--eviction", help="The expert cache's eviction order (with --cache): next-use (the expert expected to be needed last: its layer's place in the token's cycle, how often it is routed to lately, its bytes), frequency (GreedyDual with routing frequencies) or lru."),
    form: str | None = typer.Option(None, "--form", help="The experts' form in memory (containers): packed (the default: as stored, multiplied by a kernel that reads that form), decoded (dense weights), codes (a byte per weight; CPU; default cache 100%). --cache percentages are of that form."),
    kernel: str = typer.Option("auto", "--kernel", help="Kernel for packed int tensors: auto, native, int4pack, dequant, native-int16 (int16 activations), or native-int8 (int8 activations, as llama.cpp; not exact)."),
    codes: bool = typer.Option(False, "--codes", help="The same as --form codes."),
    mmap: bool = typer.Option(False, "--mmap", help="Experts view a memory map of the container's shards (no --cache): the page cache holds them, the load reads only the dense weights and checksums."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    temperature: float | None = typer.Option(None, "--temperature", help="Sample at this temperature (0: greedy). Default: the checkpoint's generation_config.json, else greedy."),
    top_p: float | None = typer.Option(None, "--top-p", help="Sample from the smallest set of tokens holding this probability."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the sampler (repeatable samples)."),
    prompts_file: Path | None = typer.Option(None, "--prompts-file", help="Prompts, one per line, generated as one batch (instead of --prompt)."),
) -> None:
    """Generate text, streaming tokens as they come (a --prompts-file batch: each continuation at the end); then
    tokens/s (prefill and decode) and, with --cache, the cache and prefetch statistics."""
    from prism_convert.tools.generate import read_prompts

    prompts = read_prompts(prompts_file) if prompts_file is not None else prompt
    _generate(model, prompts, max_new_tokens, cache=cache, prefetch="auto" if prefetch is None else prefetch,
              numa=numa or None,
              expert_form="codes" if codes else form, lookahead=lookahead, predictor=predictor,
              tokenizer=tokenizer, expert_kernel=kernel, temperature=temperature, top_p=top_p, seed=seed,
              mmap=mmap, eviction=eviction)


def _generate(model: Path, prompts: str | list[str], max_new_tokens: int, **options) -> None:
    """Stream the text (a batch: each prompt numbered, then its continuation), then the speeds and cache tables."""
    from prism_convert.cli.render import layer_table, stats_table
    from prism_convert.tools.generate import run_prompt

    batch, count = not isinstance(prompts, str), [0]

    def show(text: str, role: str) -> None:
        if role == "prompt":
            if batch:
                console.print(f"[dim][{count[0]}][/] ", end="")
                count[0] += 1
            console.print(text, end="", style="bold", highlight=False, markup=False)
        elif role == "text":
            console.print(text, end="", highlight=False, markup=False)
        elif role == "note":  # what run_prompt chose for the user (an expert cache for a model that does not fit)
            console.print(f"[dim]{text}[/]", highlight=False)
        else:
            console.print()

    result = run_prompt(model, prompts, max_new_tokens, show, **options)
    if "stats" in result:
        console.print(stats_table(result["stats"], result["seconds"]))
        console.print(layer_table(result["stats"]))
    console.print(f"[dim]prefill {result['prompt_tokens']} tokens in {result['prefill_seconds']:.3f} s "
                  f"({result['prefill_tokens_per_second']:.1f} tokens/s); decode {result['decode_tokens']} tokens in "
                  f"{result['decode_seconds']:.2f} s ({result['decode_tokens_per_second']:.1f} tokens/s)[/]",
                  highlight=False)


@app.command("eval")
def eval_(
    packed: Path = typer.Argument(..., help="The converted model (.prism container or checkpoint folder)."),
    reference: Path = typer.Option(..., "--reference", "-r", help="The original checkpoint folder."),
    dataset: str = typer.Option("builtin:mix", "--dataset", "-d", help="Held-out text (its held-out split, as for calibration): builtin:prose|code|mix, a file, or hf:NAME."),
    samples: int = typer.Option(32, "--samples", min=1, help="Number of token sequences."),
    seq_len: int = typer.Option(256, "--seq-len", min=2, help="Tokens per sequence."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Default: the original's tokenizer, else the packed model's. " + TOKENIZER_HELP),
) -> None:
    """Perplexity of both models and KL(original || packed) on held-out text (never the calibration split)."""
    from rich.table import Table

    import prism_convert

    result = prism_convert.evaluate(packed, reference=reference, dataset=dataset, samples=samples, seq_len=seq_len,
                                    seed=seed, tokenizer=tokenizer)
    if as_json:
        import json

        print(json.dumps(result, indent=1))
        return
    t = Table(title=f"{packed.name} vs {reference.name}: {result['tokens']:,} held-out tokens of {dataset}",
              title_justify="left")
    for name in ("KL (nats/token)", "perplexity (original)", "perplexity (packed)", "top-1 agreement"):
        t.add_column(name, justify="right")
    t.add_row(f"{result['kl']:.4f}", f"{result['perplexity_reference']:.3f}", f"{result['perplexity']:.3f}",
              f"{result['top1_agreement']:.1%}")
    console.print(t)
    if "heldout" in result:
        console.print(f"[dim]held out: {result['heldout']}[/]", highlight=False)


@app.command()
def plan(
    model: str = typer.Argument(..., help="config.json, a checkpoint folder, or a .prism container."),
    bits: float | None = typer.Option(None, "--bits", help="Routed-expert bits: 2-6 or 8 (int, group scales counted), 16 (bf16), or an average like 2.5. Not for containers."),
    gpu: str = typer.Option(..., "--gpu", help="GPU memory, e.g. 24GB (0 for a CPU-only machine)."),
    ram: str = typer.Option(..., "--ram", help="RAM for the model, e.g. 64GB."),
    context: int = typer.Option(4096, "--context", help="Tokens of KV cache to reserve."),
    group_size: int = typer.Option(128, "--group-size", help="Input channels per fp16 scale+zero pair."),
    dense: str = typer.Option("bf16", "--dense", help="Dense weights: bf16 | int8 | same (as the experts)."),
    zipf: float = typer.Option(0.0, "--zipf", help="Routing skew: 0 uniform; a>0 weighs the r-th hottest expert (r+1)^-a."),
    gpu_bandwidth: str = typer.Option("1000GB/s", "--gpu-bandwidth"),
    pcie_bandwidth: str = typer.Option("25GB/s", "--pcie-bandwidth"),
    ram_bandwidth: str = typer.Option("60GB/s", "--ram-bandwidth"),
    disk_bandwidth: str = typer.Option("5GB/s", "--disk-bandwidth"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """What fits in GPU, RAM and disk at these bits, and the bandwidth-bound ceiling of decode tokens/s."""
    import json

    from prism_convert.tools import fit as plan_mod

    size = plan_mod.parse_bytes
    machine = plan_mod.Machine(
        size(gpu, "--gpu"), size(ram, "--ram"), size(gpu_bandwidth, "--gpu-bandwidth"),
        size(pcie_bandwidth, "--pcie-bandwidth"), size(ram_bandwidth, "--ram-bandwidth"),
        size(disk_bandwidth, "--disk-bandwidth"),
    )
    result = plan_mod.plan(model, bits, machine.gpu_bytes, machine.ram_bytes, context=context,
                           group_size=group_size, dense=dense, zipf=zipf, machine=machine)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    from prism_convert.cli.render import fit_tables

    for part in fit_tables(result):
        console.print(part, highlight=False)


@app.command()
def push(
    container: Path = typer.Argument(..., help="A .prism container folder."),
    repo_id: str = typer.Argument(..., help="Hub repository, ORG/NAME (created if needed)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to push to (created if needed)."),
    token: str | None = typer.Option(None, "--token", help="Hub token (default: the saved login or HF_TOKEN)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Override the card's base_model (ORG/NAME)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write README.md and list the files; upload nothing."),
) -> None:
    """Upload a container to the Hugging Face Hub with a generated model card (resumable: re-run to continue)."""
    from prism_convert.cli.render import push_table
    from prism_convert.tools.push import push as push_container

    result = push_container(container, repo_id, private=private, revision=revision, token=token,
                            dry_run=dry_run, base_model=base_model)
    console.print(push_table(result))
    if dry_run:
        console.print(f"dry run: wrote {container / 'README.md'}; nothing was uploaded")
    else:
        console.print(f"uploaded to https://huggingface.co/{repo_id}"
                      + (f" ({result.commit_url})" if result.commit_url else ""))


@app.command()
def verify(
    container: Path = typer.Argument(..., help="A .prism container folder."),
    checksums: bool = typer.Option(True, "--checksums/--no-checksums", help="Read every byte and compare checksums."),
) -> None:
    """Check a container against its manifest (files, headers, byte ranges, checksums); exit 1 naming each problem."""
    from prism_load.container.verify import verify_container

    read = [0]
    with _progress() as progress:

        def advance(n: int, total: int) -> None:
            read[0] += n
            progress("verifying", read[0], total)

        problems = verify_container(container, checksums, advance)
    for problem in problems:
        err_console.print(f"[bold red]damaged:[/] {problem}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    console.print(f"{container}: intact{'' if checksums else ' (checksums not read)'}")


@app.command()
def inspect(
    container: Path = typer.Argument(..., help="A .prism container folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Summarise a container: model, tiers, bits histogram, bytes per tier, hottest experts, overhead."""
    import json

    from prism_convert.cli.render import summary_tables
    from prism_convert.tools.inspect_container import inspect_container

    summary = inspect_container(container)
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    console.print(summary_tables(summary))


@app.command()
def reference(
    out: Path | None = typer.Option(None, "-o", "--out", help="Folder to write (default: the cache, $PRISM_CACHE or ~/.cache/prism)."),
    preset: str = typer.Option("full", "--preset", help="tiny (tests, seconds), quick, full (the largest; its training.json records how long training took)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default: the preset's own, so the model is the same bits on any machine)."),
) -> None:
    """Train the reference Mixtral-layout MoE on built-in prose + code and save it as a HF checkpoint."""
    from prism_reference.train import preset_by_name, reference_model, train_reference

    preset_by_name(preset)
    with _progress(remaining=True) as progress:
        if out is None:
            out = reference_model(preset, seed, progress=progress, threads=threads)
        else:
            train_reference(out, preset, seed, progress, threads)
    _print_training(out)


def _print_training(folder: Path) -> None:
    import json

    report = json.loads((folder / "training.json").read_text())
    loss, params = report["loss"], report["parameters"]
    console.print(f"{folder}: {report['preset']} preset, seed {report['seed']}, {params['total']:,} parameters "
                  f"({params['experts'] / params['total']:.0%} in experts)", highlight=False)
    console.print(f"{report['steps']} steps, {report['tokens_seen']:,} tokens in {report['train_seconds']:.0f} s "
                  f"({report['tokens_per_second']:,.0f} tokens/s); total {report['seconds']:.0f} s", highlight=False)
    for split in ("train", "heldout"):
        parts = ", ".join(f"{d} {v:.3f}" for d, v in loss[split].items() if v is not None)
        console.print(f"{split} loss (nats/token): {parts}", highlight=False)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's warnings (a slower kernel path, a cache too small for a layer step) as one line on stderr,
    as errors are: the message is written for the user; the source line it came from is not."""
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, no traceback; warnings one
    line each."""
    import warnings

    warnings.showwarning = _show_warning
    try:
        app()
    except PrismError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
