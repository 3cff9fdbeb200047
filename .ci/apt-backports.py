#!/usr/bin/env python3
"""Writes an apt source for a Debian release's backports, made from the
machine's own Debian source (.ci/nested-svm.sh takes QEMU from there).

    python3 .ci/apt-backports.py CODENAME OUT.sources

Takes the first enabled `deb` source whose suites include CODENAME itself
(deb822 *.sources, or one-line sources.list / *.list) and writes OUT as a
deb822 source with the same URIs, components and key (Signed-By), suite
CODENAME-backports. Writes nothing when a backports source is already there
(exit 0); exits 1 when no source for CODENAME is found. No mirror is named
in this repository: whatever the machine uses is used.
"""

import glob
import os
import re
import sys


def deb822(path):
    """The stanzas of a deb822 file, as {lowercased field: value}."""
    with open(path, errors="replace") as f:
        text = f.read()
    for block in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in block.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line  # continuation (an inline key)
            elif ":" in line:
                key, val = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = val.strip()
        yield fields


def main():
    codename, out = sys.argv[1], sys.argv[2]
    bpo = f"{codename}-backports"
    found = None  # (file, URIs, components, extra field lines)
    has_bpo = False
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        if os.path.abspath(path) == os.path.abspath(out):
            continue
        for f in deb822(path):
            if "deb" not in f.get("types", "").split():
                continue
            if f.get("enabled", "yes").lower() == "no":
                continue
            suites = f.get("suites", "").split()
            has_bpo |= bpo in suites
            if codename in suites and f.get("uris") and found is None:
                extra = [f"Signed-By: {f['signed-by']}"] if f.get("signed-by") else []
                found = (path, f["uris"], f.get("components") or "main", extra)
    one_line = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    for path in one_line:
        if not os.path.exists(path):
            continue
        with open(path, errors="replace") as lines:
            for line in lines:
                m = re.match(r"\s*deb\s+(?:\[([^]]*)\]\s+)?(\S+)\s+(\S+)\s*([^#]*)", line)
                if not m:
                    continue
                opts, uri, suite, comps = m.groups()
                has_bpo |= suite == bpo
                if suite == codename and found is None:
                    extra = []
                    for o in (opts or "").split():
                        k, _, v = o.partition("=")
                        if k == "signed-by":
                            extra.append(f"Signed-By: {v}")
                    found = (path, uri, comps.strip() or "main", extra)
    if has_bpo:
        print(f"{bpo} is already among the apt sources")
        return 0
    if found is None:
        print(f"no enabled deb source for {codename}", file=sys.stderr)
        return 1
    path, uris, comps, extra = found
    text = "\n".join(
        [
            f"# Made by snapvm's .ci/nested-svm.sh from {path}: {bpo}, for QEMU.",
            "Types: deb",
            f"URIs: {uris}",
            f"Suites: {bpo}",
            f"Components: {comps}",
            *extra,
        ]
    )
    with open(out + ".tmp", "w") as f:
        f.write(text + "\n")
    os.rename(out + ".tmp", out)
    print(f"{out}: {bpo} from the source in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
