"""An environment holding only what an extra of `mico-transformers` declares, built from the installed packages.

`dependency_closure(extras)` follows pyproject's requirements (the base dependencies plus those of `extras`,
self-references such as `mico-transformers[train]` expanded) through every installed distribution's own
requirements (`importlib.metadata`), markers evaluated for this interpreter. `build_site(directory, closure)` lays
out a site directory of symlinks to exactly those distributions' files (their `.dist-info` included, so
`importlib.metadata` and Transformers' availability checks see only them). A Python started with `-S` and
`PYTHONPATH=<site>:<repo>` then behaves as a virtual environment where only that extra was installed: importing a
package outside the closure raises `ModuleNotFoundError`, and `UndeclaredImportFinder` names the culprit.
Nothing is downloaded or installed, so this runs offline.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import sys
import sysconfig
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement


if sys.version_info >= (3, 11):
    import tomllib
else:  # the dev extra installs tomli there
    import tomli as tomllib


ROOT = Path(__file__).resolve().parents[1]
PROJECT = "mico-transformers"


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of `-_.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """pyproject's base dependencies and those of `extras`, with `mico-transformers[...]` self-references expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    pending, seen, found = list(extras), set(), [Requirement(text) for text in project["dependencies"]]
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r}; it has {sorted(optional)}")
        seen.add(extra)
        for text in optional[extra]:
            requirement = Requirement(text)
            if normalize(requirement.name) == PROJECT:
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def dependency_closure(extras: tuple[str, ...] = ()) -> set[str]:
    """Normalised names of every distribution `mico-transformers[extras]` needs here, transitively."""
    environment = default_environment()
    pending = [(requirement, "") for requirement in project_requirements(extras)]
    closure: set[str] = set()
    wanted_extras: dict[str, set[str]] = {}
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        name = normalize(requirement.name)
        new_extras = set(requirement.extras) - wanted_extras.get(name, set())
        if name in closure and not new_extras:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError as error:
            raise RuntimeError(f"{name} (needed by {PROJECT}{list(extras)}) is not installed here") from error
        closure.add(name)
        wanted_extras.setdefault(name, set()).update(requirement.extras)
        for text in requires:
            for requested in ["", *sorted(wanted_extras[name])]:
                pending.append((Requirement(text), requested))
    return closure


def site_distributions() -> dict[str, metadata.Distribution]:
    """The distributions installed in this interpreter's site-packages, by normalised name."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    found = {}
    for distribution in metadata.distributions(path=[str(site)]):
        found.setdefault(normalize(distribution.metadata["Name"]), distribution)
    return found


def build_site(directory: Path, closure: set[str]) -> set[str]:
    """Fill `directory` with symlinks to the files of the distributions in `closure` (and no others); returns the
    top-level names it holds. A folder shared with a distribution outside the closure (a namespace package) is made
    for real and filled file by file, so nothing of the other distribution leaks in."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    owners: dict[tuple[str, ...], set[str]] = {}
    for name, distribution in site_distributions().items():
        for file in distribution.files or []:
            parts = Path(file).parts
            if parts and parts[0] != ".." and "__pycache__" not in parts:
                for depth in range(1, len(parts) + 1):
                    owners.setdefault(parts[:depth], set()).add(name)
    missing = closure - set(site_distributions())
    if missing:
        raise RuntimeError(f"not installed in {site}: {sorted(missing)}")
    directory.mkdir(parents=True, exist_ok=True)
    for parts, names in sorted(owners.items()):
        if not names & closure or not (site.joinpath(*parts)).exists():
            continue
        parent_owners = owners.get(parts[:-1], set()) if len(parts) > 1 else None
        if parent_owners is not None and parent_owners <= closure:
            continue  # inside a folder already linked whole
        target = directory.joinpath(*parts)
        if names <= closure or site.joinpath(*parts).is_file():
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(site.joinpath(*parts), target)
        else:
            target.mkdir(parents=True, exist_ok=True)
    return {parts[0] for parts, names in owners.items() if len(parts) == 1 and names & closure}
