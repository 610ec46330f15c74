"""Plots target/bench/migrate.json (from bench-migrate) into docs/, one
question per plot, from the same run as docs/bench-migrate.md:

- bench-migrate-delay.png: how long does the client wait at a migration,
  by image size? (median and range of the runs, capture on)
- bench-migrate-throughput.png: what does the client receive around a
  move? (the largest image, 100 ms windows, pre-copy and pause marked)
- bench-migrate-window.png: does the client's TCP sender back off? (its
  upstream cwnd around the move, one small panel per image size)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "target/bench/migrate.json"))
rows = [r for r in rows if r.get("runs")]
sizes = sorted({r["size_mib"] for r in rows})
loads = [l for l in ("120M", "full") if any(r["rate"] == l for r in rows)] or sorted({r["rate"] for r in rows})


def label(size):
    return f"{size // 1024} GiB" if size >= 1024 and size % 1024 == 0 else f"{size} MB"


def runs(size, rate, capture=True):
    for r in rows:
        if r["size_mib"] == size and r["rate"] == rate and r["capture"] == capture:
            return r["detail"]
    return []


# 1. The wait at a migration, by size.
fig, ax = plt.subplots(figsize=(8, 4.2))
x = list(range(len(sizes)))
series = [(f"client gap, {l} load", l, "migration_gap_ms", "o") for l in loads]
series.append(("VMM downtime (pause to running there), 120M", loads[0], "downtime_ms", "s"))
width = 0.8 / len(series)
for i, (name, rate, key, marker) in enumerate(series):
    xs, med, lo, hi = [], [], [], []
    for j, s in enumerate(sizes):
        vals = sorted(d[key] for d in runs(s, rate) if d.get(key) is not None)
        if not vals:
            continue
        m = vals[len(vals) // 2]
        xs.append(j - 0.4 + width * (i + 0.5))
        med.append(m)
        lo.append(m - vals[0])
        hi.append(vals[-1] - m)
    ax.errorbar(xs, med, yerr=[lo, hi], fmt=marker, capsize=3, label=name)
own = []
for s in sizes:
    vals = sorted(d["own_gap_ms"] for d in runs(s, loads[0]) if d.get("own_gap_ms") is not None)
    own.append(vals[len(vals) // 2] if vals else float("nan"))
ax.plot(x, own, "k:", label=f"the stream's own largest gap, no migration ({loads[0]})")
ax.set_xticks(x)
ax.set_xticklabels([label(s) for s in sizes])
ax.set_xlabel("image size (guest memory touched)")
ax.set_ylabel("ms (median; bars: fastest to slowest run)")
ax.set_title("How long the client waits at a live migration (capture on; cf. TCPmig Fig. 5)")
ax.set_ylim(bottom=0)
ax.legend(fontsize=7, loc="upper left")
fig.tight_layout()
fig.savefig("docs/bench-migrate-delay.png", dpi=120)

# 2. Throughput around the move, largest image, 120M, capture on.
big = sizes[-1]
fig, ax = plt.subplots(figsize=(8, 4))
missed = []
for rate in loads:
    # A run whose pause lies inside the client's recorded windows (a long
    # pre-copy under full load can end after the recording).
    d = next(
        (d for d in runs(big, rate)
         if d["migration_at_s"] + d["total_ms"] / 1e3 < len(d["windows"]) * 0.1),
        None,
    )
    if not d:
        if runs(big, rate):
            missed.append(rate)
        continue
    at, total, down = d["migration_at_s"], d["total_ms"] / 1e3, d["downtime_ms"] / 1e3
    w = d["windows"]
    t = [i * 0.1 - at for i in range(len(w))]
    ax.step(t, [b * 10 / 1e6 for b in w], where="post", label=f"{rate} load")
    ax.axvspan(0, total - down, color="tab:blue" if rate == loads[0] else "tab:orange", alpha=0.08)
    ax.axvline(total - down, color="red", lw=0.8)
note = "shaded: pre-copy (the VM runs); red line: the pause"
if missed:
    note += f"; not shown ({', '.join(missed)} load): the pause came after the client's recording ended"
ax.text(0.01, 0.02, note, transform=ax.transAxes, fontsize=7)
ax.set_xlabel("s from the start of the migration")
ax.set_ylabel("client throughput, MB/s (100 ms windows)")
ax.set_title(f"What the client receives around a migration, {label(big)} image, capture on")
ax.set_ylim(bottom=0)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig("docs/bench-migrate-throughput.png", dpi=120)

# 3. The client's upstream cwnd around the move: small multiples.
n = len(sizes)
cols = min(3, n)
rowsn = (n + cols - 1) // cols
fig, axes = plt.subplots(rowsn, cols, figsize=(3.2 * cols, 2.4 * rowsn), sharey=True, squeeze=False)
for k, s in enumerate(sizes):
    ax = axes[k // cols][k % cols]
    d = (runs(s, loads[0]) or [None])[0]
    samples = (d or {}).get("tcp", {}).get("samples", []) if d else []
    if samples:
        at, total, down = d["migration_at_s"], d["total_ms"] / 1e3, d["downtime_ms"] / 1e3
        t = [x["t"] - at for x in samples]
        ax.plot(t, [x.get("echo_cwnd") for x in samples], lw=0.8)
        ax.axvline(total - down, color="red", lw=0.8)
    ax.set_title(label(s), fontsize=9)
    ax.tick_params(labelsize=7)
for k in range(n, rowsn * cols):
    axes[k // cols][k % cols].axis("off")
fig.supxlabel("s from the start of the migration (red: the pause)", fontsize=8)
fig.supylabel("client's upstream cwnd (segments)", fontsize=8)
fig.suptitle("Does the client's TCP back off at a migration? (120 MB/s, capture on; cf. TCPmig Fig. 6)", fontsize=9)
fig.tight_layout()
fig.savefig("docs/bench-migrate-window.png", dpi=120)
print("plots: docs/bench-migrate-delay.png docs/bench-migrate-throughput.png docs/bench-migrate-window.png")
