"""Everything the `prism` command line shows: rich tables of the library's results, and the progress bars
the library's plain progress callbacks (prism_convert/progress.py) drive. The library functions return data;
only this module and cli/app.py build rich objects or print."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

from rich.console import Console, Group
from rich.table import Table

from prism_convert.allocation.bit_plan import BitPlan
from prism_convert.tools.fit import human_bytes
from prism_convert.tools.push import PushPlan, gigabytes


@contextmanager
def progress_bars(console: Console, remaining: bool = False):
    """A progress callback (description, done, total) shown as rich progress bars: one bar per stage, the stage
    being the description up to its first colon."""
    from rich import progress as rp

    columns = [rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn()]
    if remaining:
        columns.append(rp.TimeRemainingColumn())
    with rp.Progress(*columns, console=console, transient=False) as bars:
        tasks: dict[str, rp.TaskID] = {}

        def update(description: str, done: int, total: int) -> None:
            stage = description.split(":", 1)[0]
            if stage not in tasks:
                tasks[stage] = bars.add_task(description, total=total)
            bars.update(tasks[stage], completed=done, total=total, description=description)

        yield update


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _mib(n) -> str:
    return f"{n / 2**20:,.2f} MiB"


# -- prism profile / shift ----------------------------------------------------------------------------------
def profile_table(data: dict) -> Table:
    table = Table(title=f"routing profile: {data['tokens']:,} tokens, top-{data['top_k']}", show_lines=False)
    for col in ("layer", "entropy (bits)", "top expert", "top 25%", "next-layer recall", "recall@2k",
                "fitted vs shadow, next (held back)", "two ahead", "temporal reuse", "rare"):
        table.add_column(col, justify="right")
    for x in data["layers"]:
        recall = x["next_layer_recall"]
        at2k = x.get("next_layer_recall_at_2k")
        table.add_row(
            str(x["layer"]),
            f"{x['routing_entropy_bits']:.2f} / {x['max_entropy_bits']:.2f}",
            f"{x['top_expert_share']:.1%}",
            f"{x['top_quarter_share']:.1%}",
            "—" if recall is None else f"{recall:.1%}",
            "—" if at2k is None else f"{at2k:.1%}",
            _fitted(x, 1),
            _fitted(x, 2),
            f"{x['temporal_reuse']:.1%} (indep. {x['temporal_reuse_baseline']:.1%})",
            str(len(x["rare_experts"])),
        )
    return table


def _fitted(x: dict, distance: int) -> str:
    p = next((p for p in x.get("predictors", ()) if p["distance"] == distance), None)
    if p is None:
        return "—"
    return f"{p['recall']:.1%} vs {p['shadow_recall']:.1%}" + (" (used)" if p["recall"] > p["shadow_recall"] else "")


def shift_table(shift: dict) -> Table:
    table = Table(title=f"routing shift: {shift['a']} vs {shift['b']} (mean TV {shift['mean_total_variation']:.3f})")
    for col in ("layer", "TV distance", "hot only in A", "hot only in B"):
        table.add_column(col, justify="right")
    for x in shift["layers"]:
        table.add_row(str(x["layer"]), f"{x['total_variation']:.3f}", str(x["hot_only_in_a"]), str(x["hot_only_in_b"]))
    return table


# -- the bit plan (compress, pack, convert) ------------------------------------------------------------
def plan_table(plan: BitPlan) -> Table:
    title = (f"allocation: {plan.bits_per_expert_weight:.3f} bits per expert weight stored, "
             f"{plan.runtime_bits_per_expert_weight:.3f} held by the "
             f"packed runtime (priced {plan.budget.price}); {plan.total_bytes / 2**20:,.1f} MiB total "
             f"({plan.expert_bytes / 2**20:,.1f} MiB experts, {plan.dense_bytes / 2**20:,.1f} MiB dense)")
    table = Table(title=title)
    for col in ("layer", "mean bits", "min–max", "hot 25%", "rest", "low-rank"):
        table.add_column(col, justify="right", no_wrap=True)  # numbers stay whole; the encodings column wraps
    table.add_column("most used encodings", justify="left", overflow="fold")
    for layer in plan.layers():
        experts = plan.layer(layer)
        bits = [x.bits_per_weight for x in experts]
        ranked = sorted(experts, key=lambda x: -x.tokens)
        quarter = max(1, -(-len(ranked) // 4))
        hot, rest = ranked[:quarter], ranked[quarter:]
        mean = lambda xs: sum(x.bits_per_weight for x in xs) / len(xs) if xs else float("nan")
        labels = defaultdict(int)
        lowrank = 0
        for x in experts:
            for t in x.tensors:
                labels[t.label] += 1
                lowrank += t.rank is not None
        common = " ".join(f"{k}×{v}" for k, v in sorted(labels.items(), key=lambda kv: -kv[1])[:3])
        table.add_row(str(layer), f"{sum(bits) / len(bits):.2f}", f"{min(bits):.2f}–{max(bits):.2f}",
                      f"{mean(hot):.2f}", f"{mean(rest):.2f}", str(lowrank), common)
    return table


# -- prism inspect ----------------------------------------------------------------------------------------
def summary_tables(s: dict) -> Group:
    """Rich rendering of inspect_container's summary."""
    model = s["model"]
    head = Table(title=f"{s['path']} (format {s['format_version']}, {s['writer']})", show_header=False)
    head.add_row("source", f"{s['source']['model_id']} @ {s['source']['revision'] or '-'}")
    head.add_row("model", f"{model['model_type']}: {model['num_hidden_layers']} layers ({model['moe_layers']} MoE), "
                          f"{model['num_experts']} experts, top-{model['num_experts_per_tok']}, hidden {model['hidden_size']}")
    b = s["bytes"]
    head.add_row("bytes", f"dense {_mib(b['dense'])}, experts {_mib(b['experts'])}, tokenizer {_mib(b['tokenizer'])}"
                          + (f", predictor {_mib(b['predictor'])}" if b["predictor"] else ""))
    if s["predictor"]:
        head.add_row("prefetch", "fitted predictors " + ", ".join(
            f"{x['from_layer']}→{x['layer']} ({x['recall']:.0%} vs shadow {x['shadow_recall']:.0%})" for x in s["predictor"])
            + " — recall on the profile's held-back tokens")
    o = s["overhead"]
    head.add_row("overhead", f"{o['bits_per_expert_weight']:.4f} bits per expert weight (manifest {o['manifest_bytes']:,} B, "
                             f"headers {o['header_bytes']:,} B, padding {o['padding_bytes']:,} B)")
    if s["quality"]:
        head.add_row("quality", ", ".join(f"{k}={v}" for k, v in s["quality"].items()))

    tiers = Table(title="tiers")
    for col in ("tier", "experts", "shards", "bytes", "bits/weight", "held by the runtime"):
        tiers.add_column(col, justify="right" if col != "tier" else "left")
    for name, t in s["tiers"].items():
        tiers.add_row(name, str(t["experts"]), str(t["shards"]), _mib(t["bytes"]), f"{t['bits_per_weight']:.3f}",
                      f"{_mib(t['runtime_bytes'])}, {t['runtime_bits_per_weight']:.3f} bits")

    hist = Table(title="experts by bits per weight")
    hist.add_column("bits/weight", justify="right")
    hist.add_column("experts", justify="right")
    hist.add_column("")
    top = max(s["bits_histogram"].values(), default=1)
    for k, v in s["bits_histogram"].items():
        hist.add_row(k, str(v), "█" * max(1, round(30 * v / top)))

    hot = Table(title="hottest experts")
    for col in ("layer", "expert", "tier", "frequency", "gate mass", "placement", "bits/weight", "rank"):
        hot.add_column(col, justify="right")
    for r in s["hottest_experts"]:
        hot.add_row(str(r["layer"]), str(r["expert"]), r["tier"], f"{r['frequency']:.4f}", f"{r['gate_mass']:.4f}",
                    r["placement"], f"{r['bits_per_weight']:.3f}", str(r["rank"]))
    return Group(head, tiers, hist, hot)


# -- prism push -------------------------------------------------------------------------------------------
def push_table(plan: PushPlan):
    """The files a push sends, for the terminal."""
    where = f"{plan.repo_id}" + (f" @ {plan.revision}" if plan.revision else "")
    table = Table(
        title=f"{where}{' (private)' if plan.private else ''}: {len(plan.files)} files, {gigabytes(plan.total_bytes)}"
    )
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for name, n in plan.files:
        table.add_row(name, f"{n:,}")
    return table


# -- prism plan (fit) -------------------------------------------------------------------------------------
def fit_tables(result: dict) -> list:
    """Rich renderables for the terminal: classes, tiers, the verdict and the assumptions behind it."""
    a, params = result["assumptions"], result["parameters"]
    classes = Table(
        title=f"{result['model']['model_type']}: {params['total'] / 1e9:,.2f} B parameters, "
        f"{params['active_per_token'] / 1e9:,.2f} B active per token"
    )
    for col in ("class", "parameters", "stored"):
        classes.add_column(col, justify="right" if col != "class" else "left")
    for cls, n in result["class_bytes"].items():
        if params[cls]:
            classes.add_row(cls.replace("_", " "), f"{params[cls]:,}", human_bytes(n))
    classes.add_row(
        "[bold]total", f"[bold]{params['total']:,}", f"[bold]{human_bytes(result['total_bytes'])}"
    )
    tiers = Table(
        title=f"placement with a KV cache of {a['context_tokens']:,} tokens "
        f"({human_bytes(result['kv_cache_bytes'])})"
    )
    for col in ("tier", "capacity", "stored", "experts", "read per token", "link", "ms per token"):
        tiers.add_column(col, justify="right" if col != "tier" else "left")
    for t in result["tiers"]:
        cap = "∞" if t["capacity_bytes"] is None else human_bytes(t["capacity_bytes"])
        bw = t["path_bandwidth_bytes_per_second"]
        tiers.add_row(
            t["name"],
            cap,
            human_bytes(t["stored_bytes"]),
            f"{t['experts']:,}",
            human_bytes(t["read_bytes_per_token"]),
            f"{human_bytes(bw)}/s",
            f"{1000 * t['read_bytes_per_token'] / bw:,.1f}",
        )
    style = "green" if result["fits"] else "bold red"
    speed = (
        f"decode ceiling: {result['tokens_per_second_ceiling']:,.1f} tokens/s (a miss stalls), "
        f"{result['tokens_per_second_overlap_ceiling']:,.1f} tokens/s with perfect prefetch "
        f"(bottleneck: {result['bottleneck']})"
    )
    notes = [
        f"[dim]storage: {a['storage']}",
        f"routing: {a['routing']}",
        "bandwidths (override with --gpu/--pcie/--ram/--disk-bandwidth): "
        + ", ".join(f"{k} {human_bytes(v)}/s" for k, v in a["bandwidths_bytes_per_second"].items()),
        f"parameters counted by the {result['model']['parameter_count']}[/]",
    ]
    warn = [f"[yellow]warning:[/] {w}" for w in result["warnings"]]
    if "container" in result:
        c = result["container"]
        notes.insert(
            0,
            f"[dim]container: {human_bytes(c['file_bytes'])} of files; hot tier {c['hot_experts']:,} experts "
            f"({human_bytes(c['hot_bytes'])}), cold tier {human_bytes(c['cold_bytes'])}[/]",
        )
    return [classes, tiers, f"[{style}]{result['verdict']}[/]", *warn, speed, "\n".join(notes)]


# -- prism run (generate) ---------------------------------------------------------------------------------
def stats_table(s: dict, seconds: float | None = None) -> Table:
    """The runtime's counters (model.stats()) as one table; seconds: the generation's wall time."""
    t = Table(title="expert cache", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    res = s["residency"]
    t.add_row("budget (fast tier)", f"{_mib(res['budget_bytes'])} of {_mib(s['expert_bytes_total'])}, every expert "
              f"as the tier holds it ({res['budget_bytes'] / s['expert_bytes_total']:.0%})")
    t.add_row("resident", f"{res['fast_experts']} experts, {_mib(res['fast_bytes'])} "
              f"({res['pinned_experts']} pinned hot)")
    if "host_bytes" in res:
        t.add_row("host tier (pinned)", f"{res['host_experts']} experts, {_mib(res['host_bytes'])}")
    t.add_row("expert uses", f"{s['uses']:,}")
    t.add_row("hits / misses", f"{s['hits']:,} / {s['misses']:,} (hit rate {_pct(s['hit_rate'])})")
    stall = f"{s['stall_seconds']:.3f} s"
    if seconds:
        stall += f" ({s['stall_seconds'] / seconds:.0%} of the generation time)"
    t.add_row("stalled", stall)
    t.add_row("evictions", f"{s['evictions']:,} (order: {s['eviction']})")
    t.add_row("bytes fetched (cold tier)", f"{_mib(s['bytes_fetched'])} in {s['loads']:,} reads")
    if s.get("native_loads"):
        t.add_row("misses served in the decode loop", f"{s['native_loads']:,} of {s['demand_loads']:,} demand loads")
    if s.get("prefetch"):
        pairs = s.get("predictor_layers", [])
        t.add_row("predicted by", "the shadow router" if not pairs else
                  "fitted: " + ", ".join(f"{i}→{j}" for j, i in pairs) + "; shadow router elsewhere")
        t.add_row("prefetch recall / precision", f"{_pct(s['prefetch_recall'])} / {_pct(s['prefetch_precision'])}")
        t.add_row("prefetches used / loaded", f"{s['prefetch_used']:,} / {s['prefetch_loads']:,} "
                  f"({s['prefetch_cancelled']:,} cancelled, {s['prefetch_aborted']:,} aborted)")
        t.add_row("wasted bytes", _mib(s["wasted_bytes"]))
    return t


def layer_table(s: dict) -> Table:
    t = Table(title="per MoE layer", title_justify="left")
    for name in ("layer", "uses", "hit rate", "stall s", "recall", "precision"):
        t.add_column(name, justify="right")
    for i, x in s["layers"].items():
        hit = x["hits"] / x["uses"] if x["uses"] else None
        t.add_row(str(i), f"{x['uses']:,}", _pct(hit), f"{x['stall_seconds']:.3f}", _pct(x["recall"]),
                  _pct(x["precision"]))
    return t
