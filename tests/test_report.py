"""The docs and their data: every generated table in README.md and docs/*.md is what tools/report.py writes from
docs/*.json, and the statistics it writes them with are right on a case worked by hand."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "tools"))
import report  # noqa: E402
import stats  # noqa: E402


def run_report(*args, repo: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), "--repo", str(repo), *args],
                          capture_output=True, text=True)


def test_every_table_in_the_docs_is_what_its_json_says():
    report.tables.read_from(REPO / "docs")
    marked = 0
    for page in report.pages(REPO):
        text = page.read_text()
        new, changed = report.render(text, page.name)
        assert not changed, f"{page.name}: {changed} differ from docs/*.json; run python tools/report.py"
        marked += len(report.MARKED.findall(text))
    assert marked >= 30  # the pages do carry their tables (a test that found no marker would pass vacuously)


def test_paired_interval_against_a_hand_computed_case():
    # diffs 1, 2, 3, 4, 5: mean 3, sample std sqrt(2.5) = 1.5811, t_{0.975, 4} = 2.776,
    # half width 2.776 * 1.5811 / sqrt(5) = 1.9629 -> [1.037, 4.963]
    low, high = stats.interval([1, 2, 3, 4, 5])
    assert math.isclose(low, 3 - 2.776 * math.sqrt(2.5) / math.sqrt(5)) and math.isclose(low, 1.0371, abs_tol=1e-4)
    assert math.isclose(high, 4.9629, abs_tol=1e-4)
    assert stats.paired([3, 2, 5, 4, 6], [2, 0, 2, 0, 1]) == " +3.0 [+1.0, +5.0] (5/5)"
    assert stats.mean_std([1, 2, 3]) == "  2.0 ±  1.0"  # sample std (n - 1), not the population's 0.8
    assert not stats.detectable([1, -1, 2, -2, 0.5], [0] * 5) and stats.detectable([1, 2, 3, 4, 5], [0] * 5)
    assert stats.paired([1.0, 2.0], [1.0, 1.0]) == " +0.5 [-5.9, +6.9] (1/2)"  # a tie is not ahead
    assert math.isclose(stats.t_quantile(40), 2.021, abs_tol=1e-3)  # past the table: the series


def copy_of_the_docs(tmp_path: Path) -> Path:
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.png"))
    return tmp_path


def test_check_names_a_doctored_table_and_the_report_repairs_it(tmp_path):
    repo = copy_of_the_docs(tmp_path)
    page = repo / "docs" / "baselines.md"
    good = page.read_text()
    doctored = good.replace("| EWC | W 0.1 |  46.2", "| EWC | W 0.1 |  56.2", 1)
    assert doctored != good
    page.write_text(doctored)
    check = run_report("--check", repo=repo)
    assert check.returncode == 1 and "docs/baselines.md: table baselines_chosen" in check.stderr
    assert len(check.stderr.strip().splitlines()) == 1 and page.read_text() == doctored  # --check writes nothing
    assert run_report(repo=repo).returncode == 0 and page.read_text() == good
    readme = (repo / "README.md").stat().st_mtime_ns
    assert run_report(repo=repo).stdout == "" and (repo / "README.md").stat().st_mtime_ns == readme  # untouched


@pytest.mark.parametrize("broken, words", [("<!-- report:no_such_table -->\n<!-- /report:no_such_table -->",
                                             "no table named 'no_such_table'"),
                                            ("<!-- report:toa_k -->\n", "without its")])
def test_a_broken_marker_is_one_line(tmp_path, broken, words):
    repo = copy_of_the_docs(tmp_path)
    (repo / "docs" / "extra.md").write_text(f"# extra\n\n{broken}\n")
    result = run_report("--check", repo=repo)
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("spoil, words", [(lambda f: f.unlink(), "No such file"),
                                          (lambda f: f.write_text('{"points": ['), "Expecting"),
                                          (lambda f: f.write_text("[]"), "no list of points"),
                                          (lambda f: f.write_text('{"points": []}'), "no points of the full and LoRA"),
                                          (lambda f: f.write_text(json.dumps({"points": [
                                              p for p in json.loads(f.read_text())["points"]
                                              if p["set"] != "knowledge"]})), "no point for")])
def test_a_table_whose_json_is_missing_or_spoilt_is_one_line(tmp_path, spoil, words):
    repo = copy_of_the_docs(tmp_path)
    spoil(repo / "docs" / "fair.json")
    result = run_report("--check", repo=repo)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "README.md: table fair_headline: " in result.stderr and words in result.stderr, result.stderr
