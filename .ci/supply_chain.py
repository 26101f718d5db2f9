#!/usr/bin/env python3
"""Offline supply-chain check over `cargo metadata --locked`: every dependency's license
must be on the allowlist (SPDX expressions evaluated), and crates present in more than one
version are listed. cargo-deny would also check advisories, but its database comes from
GitHub, which this build machine cannot reach; this script needs only the lock file."""
import collections
import json
import re
import subprocess
import sys

ALLOWED = {
    "MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC", "Unlicense", "Zlib", "BSL-1.0",
    "Unicode-3.0", "Unicode-DFS-2016", "CC0-1.0", "0BSD",
    # File-level copyleft: fine to depend on unmodified (used by one transitive crate).
    "MPL-2.0",
}


def allowed(expr: str) -> bool:
    """Evaluates an SPDX expression: OR needs one allowed side, AND both."""
    expr = expr.replace("/", " OR ")
    expr = re.sub(r"\bWITH\s+[\w.+-]+", "", expr)
    tokens = re.findall(r"\(|\)|[\w.+-]+", expr)
    out = []
    for t in tokens:
        if t in ("(", ")"):
            out.append(t)
        elif t == "AND":
            out.append("and")
        elif t == "OR":
            out.append("or")
        else:
            out.append(str(t in ALLOWED))
    try:
        return bool(eval(" ".join(out), {"__builtins__": {}}))  # noqa: S307 - only True/False/and/or
    except SyntaxError:
        return False


def main() -> int:
    meta = json.loads(subprocess.check_output(["cargo", "metadata", "--locked", "--format-version", "1"]))
    workspace = set(meta["workspace_members"])
    bad = []
    versions = collections.defaultdict(set)
    for p in meta["packages"]:
        if p["id"] in workspace:
            continue
        versions[p["name"]].add(p["version"])
        lic = p.get("license")
        if not lic or not allowed(lic):
            bad.append(f"{p['name']} {p['version']}: license {lic!r} is not on the allowlist")
    dups = {n: sorted(v) for n, v in versions.items() if len(v) > 1}
    print(f"supply chain: {sum(len(v) for v in versions.values())} crate versions checked, "
          f"{len(dups)} crates in more than one version")
    for n, v in sorted(dups.items()):
        print(f"  duplicate: {n} {', '.join(v)}")
    for b in bad:
        print(f"  refused: {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
