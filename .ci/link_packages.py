"""Hard-link installed distributions (and what they require) from one venv into another.

    <source venv>/bin/python .ci/link_packages.py TARGET_SITE_PACKAGES [--exclude-from CONSTRAINTS] DIST...

The minimum-versions environment of .ci/run takes torch and torchvision this way from the main
venv: a second CUDA build of torch would cost ~5.5 GB of disk and minutes of install, hard links
cost neither. pip then sees them installed and installs only the rest, at the constraints' versions.
Distributions named in CONSTRAINTS are left out, so pip installs those at their pinned version.
Files are copied where a hard link is impossible (another file system).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str], exclude: set[str]) -> list[metadata.Distribution]:
    """The installed distributions ``names`` and, recursively, their requirements, with the extras
    they ask for (torch needs ``cuda-toolkit[cublas,cudart,...]``)."""
    seen: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(canonical(n), "") for n in names]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in done or name in exclude:
            continue
        done.add((name, extra))
        try:
            dist = seen.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (an optional platform package): pip decides
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(canonical(req.name), e) for e in ("", *req.extras)]
    return list(seen.values())


def link(dist: metadata.Distribution, target: Path) -> int:
    """Hard-link every file the distribution installed under site-packages; returns how many."""
    root = Path(dist.locate_file(""))
    count = 0
    for entry in dist.files or []:
        if str(entry).startswith(".."):  # scripts in bin/: not needed to import
            continue
        src, dst = root / entry, target / entry
        if not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        count += 1
    return count


def pinned_names(constraints: Path | None) -> set[str]:
    if constraints is None:
        return set()
    lines = (line.split("#", 1)[0].strip() for line in constraints.read_text().splitlines())
    return {canonical(Requirement(line).name) for line in lines if line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("dists", nargs="+")
    parser.add_argument("--exclude-from", type=Path)
    args = parser.parse_args()
    dists = closure(args.dists, pinned_names(args.exclude_from))
    files = sum(link(d, args.target) for d in dists)
    names = ", ".join(sorted(f"{d.metadata['Name']}=={d.version}" for d in dists))
    print(f"linked {len(dists)} distributions ({files} files) into {args.target}: {names}", file=sys.stderr)


if __name__ == "__main__":
    main()
