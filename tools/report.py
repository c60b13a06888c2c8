"""Every results table in README.md and docs/*.md, written from the JSON the experiments wrote (docs/*.json).

    python tools/report.py          # rewrite the tables that differ from what their JSON says
    python tools/report.py --check  # exit 1 naming the first table out of date; write nothing

A generated table sits in its page between two markers, `<!-- report:NAME -->` and `<!-- /report:NAME -->`;
NAME is one of report_tables.TABLES, a function that reads the points of docs/*.json (seed, setting, mode, set,
answer match) and returns the markdown. This program rewrites exactly the text between the markers and nothing
else, so no number in a table is typed by hand, and tests/test_report.py fails when a page and its data part.
"""
import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import report_tables as tables  # noqa: E402 (tools/ is this program's folder)
from common import UserError, atomic_write, run_cli  # noqa: E402

TABLES = tables.TABLES
MARKED = re.compile(r"(<!-- report:([\w-]+) -->\n)(.*?)(<!-- /report:\2 -->)", re.S)


# --- the pages ------------------------------------------------------------------------------------------------

def pages(repo: Path) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def render(text: str, where: str) -> tuple[str, list[str]]:
    """text with every marked table written afresh, and the names of those that changed."""
    if text.count("<!-- report:") != len(MARKED.findall(text)):
        raise UserError(f"{where}: a <!-- report:NAME --> marker without its <!-- /report:NAME --> (or nested)")
    changed = []

    def fill(match):
        start, name, old, end = match.groups()
        if name not in TABLES:
            raise UserError(f"{where}: no table named {name!r} (tools/report.py knows {', '.join(TABLES)})")
        try:
            new = TABLES[name]() + "\n"
        except (OSError, json.JSONDecodeError, tables.DataError) as e:  # its docs/*.json missing, not JSON, short
            raise UserError(f"{where}: table {name}: {e}") from None
        if new != old:
            changed.append(name)
        return start + new + end
    return MARKED.sub(fill, text), changed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 naming the first table out of date")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose README.md and docs/ to read "
                   "(default: this one; the JSON is read from it too)")
    args = p.parse_args(argv)
    tables.read_from(args.repo / "docs")
    for page in pages(args.repo):
        text = page.read_text()
        new, changed = render(text, str(page.relative_to(args.repo)))
        if not changed:
            continue
        if args.check:
            print(f"{page.relative_to(args.repo)}: table {changed[0]} differs from docs/*.json; run python "
                  "tools/report.py", file=sys.stderr)
            sys.exit(1)
        with atomic_write(str(page)) as tmp:
            Path(tmp).write_text(new)
        print(f"wrote {page.relative_to(args.repo)}: {', '.join(changed)}")


if __name__ == "__main__":
    run_cli(main)
