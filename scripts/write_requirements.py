"""Write requirements.txt from pyproject.toml's runtime dependencies (``make requirements``).

    python scripts/write_requirements.py           # rewrite requirements.txt
    python scripts/write_requirements.py --check   # exit 1 if requirements.txt is out of date

pyproject.toml is the one place dependencies are declared; requirements.txt exists for the seed's
``pip install -r requirements.txt`` and is only ever generated. tests/test_packaging.py fails when
the two drift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ImportError:
        sys.exit("write_requirements.py needs Python 3.11+ (tomllib) or the tomli package")

ROOT = Path(__file__).resolve().parent.parent


def render(pyproject: dict) -> str:
    """The text of requirements.txt for a parsed pyproject.toml."""
    project = pyproject["project"]
    name = project["name"]
    extras = project.get("optional-dependencies", {})
    width = max((len(extra) for extra in extras), default=0)
    header = [
        "# Generated from pyproject.toml ([project] dependencies) by scripts/write_requirements.py:",
        "# do not edit; change pyproject.toml, then run `make requirements`.",
        "#",
        f"# The core runtime dependencies of {name}. Optional features are extras ({name}[<extra>]),",
        "# installed from this checkout with pip install -e '.[<extra>]' (several: pip install -e '.[train,amg]'):",
    ]
    header += [
        f"#   {name}[{extra}]{' ' * (width - len(extra))}  {', '.join(deps)}"
        for extra, deps in extras.items()
    ]
    return "\n".join(header + list(project["dependencies"])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if requirements.txt is out of date")
    args = parser.parse_args(argv)
    text = render(tomllib.loads((ROOT / "pyproject.toml").read_text()))
    path = ROOT / "requirements.txt"
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is out of date: run `make requirements`", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
