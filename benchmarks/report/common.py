"""What every report section reads: the JSON files benchmarks wrote, their provenance, rows by
key, and the generated blocks of a text file (between two markers)."""
from __future__ import annotations

import json
import os


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def provenance(m: dict) -> str:
    """'commit X' with what the JSON says of the tree: clean, changed files, or not recorded."""
    dirty = m.get("dirty")
    if dirty is None:
        return f"commit {m.get('commit')} (whether the tree was clean was not recorded)"
    if not dirty:
        return f"commit {m.get('commit')}, clean tree"
    return (f"commit {m.get('commit')} plus uncommitted changes to {', '.join(dirty)} "
            "(not a committed state: see the commit that added this JSON)")



def row(gen: dict, engine: str, config: str, backend: str = "-", batch: int = 1) -> dict | None:
    return next((r for r in gen["rows"] if (r["engine"], r["config"], r["backend"], r["batch"])
                 == (engine, config, backend, batch) and "error" not in r), None)



def fastest_counts(mix: dict) -> dict:
    """{backend: rows where it was the fastest mixing backend}, base excluded."""
    best = {}
    for w in mix["rows"]:
        if w["backend"] == "base" or w.get("ms") is None:
            continue
        key = (w["shape"], w["K"], w["r"], w["T"], w["gates"])
        if key not in best or w["ms"] < best[key][1]:
            best[key] = (w["backend"], w["ms"])
    counts = {}
    for b, _ in best.values():
        counts[b] = counts.get(b, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))



def plot_generate(result: dict, out_png: str) -> str | None:
    """Bar chart: decode tokens/s per configuration (pf_engine rows and peers)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result["rows"] if "error" not in r]
    labels = [f"{r['engine'].replace('pf_engine', 'pf')}\n{r['config']}"
              + (f"/{r['backend']}" if r["backend"] != "-" else "") + f" B={r['batch']}"
              for r in rows]
    vals = [r["decode_tok_s"] for r in rows]
    colours = ["tab:blue" if r["engine"] == "pf_engine" else "tab:gray" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    ax.bar(range(len(rows)), vals, color=colours)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("decode tokens/s (all requests)")
    ax.set_title(f"End-to-end decode, {result['device']} {result['dtype']}, "
                 f"{result['threads']} threads")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_png), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png




def replace_block(path: str, start: str, end: str, text: str) -> None:
    """Write ``text`` (which begins with ``start`` and ends with ``end``) in place of the block
    between those markers in ``path`` (appended when there is none), atomically."""
    with open(path) as f:
        old = f.read()
    if start in old and end in old:
        new = old[:old.index(start)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)
