"""Copies a bench-migrate JSON file without its per-run TCP_INFO samples
(kept in target/bench/ for the plots; too bulky for docs/)."""
import json
import sys

rows = json.load(open(sys.argv[1]))
for row in rows:
    for run in row.get("detail", []):
        run.get("tcp", {}).pop("samples", None)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
