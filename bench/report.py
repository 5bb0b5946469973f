"""Renders ``bench/results/*.json`` as the Markdown that the README's benchmark section shows.

``python -m bench.report [DIR]`` prints, per suite, the machine the rows were measured on, the
command-line arguments, the table and the PNG plots written beside the JSON.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from bench.common import code_changes_since, format_table


def render(directory: str = "bench/results") -> str:
    parts = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        m = data["machine"]
        stem = os.path.splitext(path)[0]
        parts.append(f"### {os.path.basename(stem)} (suite `{data['suite']}`)\n")
        parts.append(
            f"Measured on {m['cpu']} ({m['cores']} cores), JAX {m['jax']} backend "
            f"`{m['backend']}` ({m['device']}), commit {m.get('commit')}; "
            f"repeats={data['args'].get('repeats')}, warmup={data['args'].get('warmup')}"
            f"{', quick shapes' if data['args'].get('quick') else ''}.\n"
        )
        changed = code_changes_since(m.get("commit"))
        if m.get("dirty") or changed:
            why = (
                f"{changed} later commit(s) changed kldiv/ or bench/"
                if changed
                else "measured with uncommitted changes"
            )
            parts.append(f"**Stale: {why}; re-run the command to refresh these rows.**\n")
        elif changed is None:
            parts.append("(Whether these rows describe the current code is unknown.)\n")
        parts.append(format_table(data["rows"]) + "\n")
        for png in sorted(glob.glob(stem + "_*.png") + glob.glob(stem + ".png")):
            parts.append(f"![{os.path.basename(png)}]({png})\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(*sys.argv[1:]))
