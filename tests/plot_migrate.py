"""Plots target/bench/migrate.json (from bench-migrate) into docs/."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "target/bench/migrate.json"))
fig, ax = plt.subplots(figsize=(7, 4))
for rate in ("120M", "full"):
    for cap in (True, False):
        pts = [r for r in rows if r["rate"] == rate and r["capture"] == cap and r["runs"]]
        xs = [r["size_mib"] for r in pts]
        ax.plot(xs, [r["migration_gap_ms_median"] for r in pts], marker="o",
                label=f"client gap, {rate}, capture {'on' if cap else 'off'}")
pts = [r for r in rows if r["rate"] == "120M" and r["capture"] and r["runs"]]
ax.plot([r["size_mib"] for r in pts], [r["own_gap_ms_median"] for r in pts], "k:", marker="s",
        label="the stream's own gap, no migration (120M)")
ax.plot([r["size_mib"] for r in pts], [r["downtime_ms_median"] for r in pts], "k--", marker="x", label="VMM downtime")
ax.set_xscale("log")
ax.set_xlabel("image size (MiB)")
ax.set_ylabel("ms")
ax.set_title("Migration delay against image size (cf. TCPmig Fig. 5)")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig("docs/bench-migrate-delay.png", dpi=120)

big = max(r["size_mib"] for r in rows)
fig, ax = plt.subplots(figsize=(7, 4))
for r in rows:
    if r["size_mib"] != big or not r["detail"]:
        continue
    d = r["detail"][0]
    w = d["windows"]
    ax.plot([i * 0.1 for i in range(len(w))], [b * 10 / 1e6 for b in w],
            label=f"{r['rate']}, capture {'on' if r['capture'] else 'off'}")
    ax.axvline(d["migration_at_s"], color="grey", lw=0.5)
ax.set_xlabel("time (s)")
ax.set_ylabel("client throughput (MB/s, 100 ms windows)")
ax.set_title(f"Throughput around a migration, {big} MiB image (cf. TCPmig Fig. 6)")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig("docs/bench-migrate-throughput.png", dpi=120)
print("plots: docs/bench-migrate-delay.png docs/bench-migrate-throughput.png")

# Fig. 6: the client's windows around the migration, one run per size
# (120M, capture on): the upstream sender's cwnd and the stream's windows.
fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
for r in rows:
    if r["rate"] != "120M" or not r["capture"] or not r["detail"]:
        continue
    d = r["detail"][0]
    s = d.get("tcp", {}).get("samples", [])
    if not s:
        continue
    at = d["migration_at_s"]
    t = [(x["t"] - at) * 1e3 for x in s]
    ax1.plot(t, [x.get("echo_cwnd") for x in s], label=f"{r['size_mib']} MiB")
    ax2.plot(t, [(x.get("snd_wnd") or 0) / 1024 for x in s], label=f"{r['size_mib']} MiB")
ax1.set_ylabel("client cwnd, upstream (segments)")
ax2.set_ylabel("service's advertised window (KiB)")
ax2.set_xlabel("ms from the migration's start")
ax1.set_title("The client's TCP windows around a migration, 120 MB/s (cf. TCPmig Fig. 6)")
ax1.legend(fontsize=7)
fig.tight_layout()
fig.savefig("docs/bench-migrate-window.png", dpi=120)
print("plot: docs/bench-migrate-window.png")
