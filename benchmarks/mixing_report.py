"""bench_mixing's output: the markdown tables (full and headline) and the PNG plots, from its JSON."""
from __future__ import annotations

import os


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def markdown(result: dict, headline: bool = False) -> str:
    """The markdown table of a result: every row, or (headline) one line per shape, T and gates
    at K = 10 and r = 16 (or the nearest run) with each backend's ms side by side."""
    return headline_table(result) if headline else format_table(result)


def bandwidth_label(result: dict) -> str:
    """'read bandwidth X GB/s' (or 'copy bandwidth', as results before the read floor recorded)."""
    if result.get("read_bandwidth_GBps"):
        return f"read bandwidth {result['read_bandwidth_GBps']:.1f} GB/s"
    return f"copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s (floor from a copy: read + write)"


def headline_table(result: dict) -> str:
    cfg = result["config"]
    K0 = 10 if 10 in cfg["K"] else max(cfg["K"])
    r0 = 16 if 16 in cfg["r"] else cfg["r"][len(cfg["r"]) // 2]
    backends = cfg["backends"]
    ms = {(w["shape"], w["T"], w["gates"], w["backend"]): w["ms"] for w in result["rows"]
          if w["K"] == K0 and w["r"] == r0}
    lines = [f"{result['device']}, {result['dtype']}, K={K0} experts of rank {r0}; ms per call "
             f"(median), {bandwidth_label(result)}", ""] + (
                 [f"**Warning: {result['busy']}.**", ""] if result.get("busy") else []) + [
             "| shape | T | gates | " + " | ".join(f"{b} ms" for b in backends)
             + " | naive / torch | torch / base |",
             "|---|---|---|" + "---|" * (len(backends) + 2)]
    seen = []
    for w in result["rows"]:
        key = (w["shape"], w["T"], w["gates"])
        if w["K"] != K0 or w["r"] != r0 or key in seen:
            continue
        seen.append(key)
        t = {b: ms.get(key + (b,)) for b in backends}
        ratio = lambda a, b: (f"{t[a] / t[b]:.2f}" if t.get(a) and t.get(b) else "-")  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     + " | ".join("FAILED" if t[b] is None else f"{t[b]:.3f}" for b in backends)
                     + f" | {ratio('naive', 'torch')} | {ratio('torch', 'base')} |")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu") if result["device"].startswith("cuda") else m["cpu"]
    cfg = result["config"]
    lines = [f"\n{where}, {result['device']}, {result['dtype']}, {result['threads']} threads, "
             f"{bandwidth_label(result)}; median of up to "
             f"{cfg['repeats']} calls ({cfg['budget']:g} s per row), rotating over >= "
             f"{cfg['rotate_mb']:g} MB of layer copies\n",
             "| shape | K | r | T | gates | backend | ms | x base | naive/this | GB/s | floor ms "
             "| % of floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in result["rows"]:
        head = f"| {w['shape']} | {w['K']} | {w['r']} | {w['T']} | {w['gates']} | {w['backend']} |"
        if w["status"] != "ok":
            err = "" if w.get("max_err_rel") is None else f" (err {w['max_err_rel']:.1e})"
            lines.append(f"{head} {w['status']}{err} | - | - | - | {w['floor_ms']:.4f} | - |")
            continue
        lines.append(f"{head} {w['ms']:.4f} | {_f(w.get('ratio_to_base'), '.2f')} | "
                     f"{_f(w.get('naive_over_this'), '.2f')} | {w['GBps']:.1f} | "
                     f"{w['floor_ms']:.4f} | {100 * w['floor_frac']:.0f}% |")
    lines.append("")
    lines.append("gates: dense = every expert for every token; top2-token = per-token top-2 "
                 "(token router); top2-seq = all tokens share the same 2 experts (explicit "
                 "personas, sequence router). base = the projection without experts (roofline). "
                 "% of floor = read-floor time (bytes / read bandwidth) / measured time.")
    lines.append(f"check: {result['check_rule']}.")
    if result.get("busy"):
        lines.append(f"WARNING: {result['busy']}.")
    if result.get("cpu_t1_policy"):
        lines.append(f"T=1 on CPU: {result['cpu_t1_policy']} (F.linear rows: torch's threads).")
    for b, s in result["backend_status"].items():
        if b in cfg["backends"]:
            continue
        why = s["why"] or ("not asked for" if s["available"] else "unavailable")
        if b == "triton" and s["available"] and result["device"] == "cpu":
            why = "interpreted on CPU (TRITON_INTERPRET=1): only timed when asked for"
        lines.append(f"not timed: {b}: {why}")
    for f in result["failures"]:
        lines.append(f"FAILED: {f}")
    return "\n".join(lines)


def draw_plots(result: dict, folder: str) -> list[str]:
    """Per shape: time vs K (smallest T) and time vs T (largest K <= 10), one line per backend and
    gates; and naive/torch vs K per T (dense).  Returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    rows = [w for w in result["rows"] if w["status"] == "ok"]
    cfg = result["config"]
    r0 = 16 if 16 in cfg["r"] else cfg["r"][len(cfg["r"]) // 2]
    T0 = min(cfg["T"])
    K0 = max([k for k in cfg["K"] if k <= 10] or cfg["K"])
    style = {"dense": "-", "top2-token": ":", "top2-seq": "--", "token-router": "-.", "regather": (0, (1, 3))}
    paths = []

    def series(sel, key):
        pts = sorted((w[key], w["ms"]) for w in rows if sel(w))
        return [a for a, _ in pts], [b for _, b in pts]

    for shape in cfg["shapes"]:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for b in cfg["backends"]:
            for kind in cfg["gates"]:
                if b in ("base", "F.linear") and kind != "dense":
                    continue
                xs_, ys_ = series(lambda w: (w["shape"], w["backend"], w["gates"], w["r"], w["T"])
                                  == (shape, b, kind, r0, T0), "K")
                if xs_:
                    ax1.plot(xs_, ys_, linestyle=style[kind], marker="o", label=f"{b} {kind}")
                xs_, ys_ = series(lambda w: (w["shape"], w["backend"], w["gates"], w["r"], w["K"])
                                  == (shape, b, kind, r0, K0), "T")
                if xs_:
                    ax2.plot(xs_, ys_, linestyle=style[kind], marker="o", label=f"{b} {kind}")
        ax1.set(xlabel="K experts", ylabel="ms", title=f"{shape}: time vs K (T={T0}, r={r0})")
        ax2.set(xlabel="T tokens", ylabel="ms", title=f"{shape}: time vs T (K={K0}, r={r0})",
                xscale="log", yscale="log")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(folder, f"mixing_{shape.replace('/', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    shapes = cfg["shapes"]
    if "naive" in cfg["backends"] and "torch" in cfg["backends"] and shapes:
        n = len(shapes)
        cols = min(n, 4)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.5 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax, shape in zip(axes.flat, shapes):
            for T in cfg["T"]:
                pts = sorted((w["K"], w["naive_over_this"]) for w in rows
                             if (w["shape"], w["backend"], w["gates"], w["r"], w["T"])
                             == (shape, "torch", "dense", r0, T) and w.get("naive_over_this"))
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=f"T={T}")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set(xlabel="K", ylabel="naive ms / torch ms", title=f"{shape} (dense, r={r0})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.tight_layout()
        path = os.path.join(folder, "naive_over_torch.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
