"""The examples runner of the docs (tests/docs_examples.py): what it accepts, and that it fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import docs_examples
from tests.docs_examples import DOCS, LANGUAGES, SYNTAX_ONLY, Page, fenced_blocks

#: Fence languages of blocks that are not examples (output, data, job definitions).
NOT_CODE = {"text", "json", "yaml", "toml"}

pytestmark = pytest.mark.skipif(docs_examples.SYBIL_MISSING is not None, reason=str(docs_examples.SYBIL_MISSING))


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_every_code_block_is_an_example_or_says_what_it_is() -> None:
    """No shell or Python escapes the runner: blocks are python or bash (run, or syntax-only with a
    known reason), or output/data in a language nothing runs."""
    run = syntax = 0
    problems = []
    for page in _pages():
        text = page.read_text()
        for offset, language, classes, _ in fenced_blocks(text):
            where = f"{page.relative_to(DOCS)}:{text.count(chr(10), 0, offset) + 1}"
            if language in ("python", "bash"):
                unknown = {c for c in classes if c not in SYNTAX_ONLY}
                if unknown:
                    problems.append(f"{where}: unknown example class(es) {sorted(unknown)}")
                elif classes & set(SYNTAX_ONLY):
                    syntax += 1
                else:
                    run += 1
            elif language not in NOT_CODE:
                problems.append(f"{where}: fence language {language!r}: write python or bash (examples) "
                                f"or one of {sorted(NOT_CODE)}")
    assert not problems, "\n".join(problems)
    assert set(LANGUAGES.values()) == {"python", "bash"}
    assert run >= 10 and run > 2 * syntax, (run, syntax)


def test_front_matter_setups_are_known() -> None:
    for page in _pages():
        docs_examples.page_setups(page.read_text())  # raises on an unknown setup


def _evaluate(tmp_path: Path, text: str) -> list[str | None]:
    from sybil import Sybil

    path = tmp_path / "page.md"
    path.write_text(text)
    document = Sybil([docs_examples.ExampleParser()], path=str(tmp_path)).parse(path)
    document.namespace["docs_page"] = Page(tmp_path, ())
    results = []
    for example in document.examples():
        results.append(docs_examples.evaluate(example))
    return results


def test_runner_runs_and_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(docs_examples, "COUNTS", {})  # these are not examples of the site
    text = "\n\n".join([
        "```python\nvalue = 21 * 2\n```",
        "```python\nassert value == 42\nraise ValueError('boom')\n```",
        "```bash\necho hello > out.txt\n```",
        "```bash\ntest -f out.txt && false\n```",
        "```python { .internet }\nimport no_such_module_anywhere\n```",
        "```python { .internet }\ndef broken(:\n```",
        "```bash { .cluster }\nkubectl apply -f job.yaml\n```",
        "```bash { .cluster }\nif then fi (\n```",
    ])
    ok1, boom, shell_ok, shell_fail, syntax_ok, syntax_bad, bash_ok, bash_bad = _evaluate(tmp_path, text)
    assert ok1 is None and shell_ok is None and syntax_ok is None and bash_ok is None
    assert (tmp_path / "out.txt").read_text() == "hello\n"
    assert boom is not None and "ValueError: boom" in boom and "line" in boom
    assert shell_fail is not None and "exited 1" in shell_fail
    assert syntax_bad is not None and "syntax error" in syntax_bad
    assert bash_bad is not None and "bash -n" in bash_bad


def test_snippets_are_included_as_the_site_includes_them(tmp_path: Path) -> None:
    text = '```bash\n--8<-- "processors/slurm/stacchip-array.sbatch"\n```'
    (_, _, _, source), = fenced_blocks(text)
    included = docs_examples.include_snippets(source)
    assert "SLURM_ARRAY_TASK_ID" in included and "--8<--" not in included
    with pytest.raises(FileNotFoundError):
        docs_examples.include_snippets('--8<-- "../outside.txt"')
    assert re.search(r"^#SBATCH", included, re.MULTILINE)


def test_benchmark_commands_on_the_performance_page_exist() -> None:
    """The commands that reproduce the performance figures are real: their module runs and takes
    every flag they are shown with (the benchmarks themselves take minutes to hours: not run)."""
    import json
    import shlex
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    figures = json.loads((root / "benchmarks" / "results.json").read_text())["figures"]
    assert figures
    commands = []
    for fig in figures:
        assert {"id", "title", "what", "unit", "better", "bars", "command", "source"} <= set(fig), fig.get("id")
        commands.append((fig["id"], fig["command"]))
    # The commands the page lists in its own ``{ .benchmark }`` blocks (every benchmark module).
    page = (DOCS / "performance.md").read_text()
    listed = [line for _, language, classes, source in fenced_blocks(page) if "benchmark" in classes
              for line in source.splitlines() if line.strip()]
    assert len(listed) >= 8, listed
    commands += [("performance.md", line) for line in listed]
    modules = {shlex.split(c)[2] for _, c in commands}
    # Every runnable module of benchmarks/ but the scene builder the others call.
    on_disk = {f"benchmarks.{p.stem}" for p in (root / "benchmarks").glob("*.py")
               if '__name__ == "__main__"' in p.read_text() and p.stem != "scene"}
    assert on_disk <= modules, f"benchmarks the performance page does not list: {sorted(on_disk - modules)}"
    helps: dict[str, str] = {}
    for where, command in commands:
        words = shlex.split(command)
        assert words[:3] == ["python", "-m", words[2]] and words[2].startswith("benchmarks."), command
        if words[2] not in helps:
            proc = subprocess.run([sys.executable, "-m", words[2], "--help"], cwd=root, capture_output=True,
                                  text=True, timeout=300, check=False)
            assert proc.returncode == 0, proc.stderr
            helps[words[2]] = proc.stdout
        for flag in (w for w in words[3:] if w.startswith("--")):
            assert flag in helps[words[2]], f"{where}: {words[2]} has no flag {flag}"


def test_readme_is_short_and_its_example_runs(tmp_path: Path, docs_demo_scene: Path) -> None:
    """README.md keeps the two fresh-machine commands verbatim (CI runs the second), stays short,
    links only to pages that exist, and its example (Python, then the same from the command line)
    runs on the demo scene."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert len(readme.splitlines()) < 120
    blocks = [(language, source) for _, language, _, source in fenced_blocks(readme)]
    shell = [source for language, source in blocks if language == "bash"]
    assert "pip install . && stacchip demo\n" in shell
    assert "bash .ci/setup && python -m pytest\n" in shell
    links = re.findall(r"\]\(((?:docs|processors)/[^)#]+)", readme)
    assert len(links) >= 15 and all((root / link).is_file() for link in links), links
    python = [source for language, source in blocks if language == "python"]
    assert len(python) == 1
    docs_examples.make_demo(docs_demo_scene, tmp_path / "demo")
    proc = subprocess.run([sys.executable, "-c", python[0]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    commands = [source for source in shell if source.startswith("stacchip ")]
    assert commands
    for source in commands:
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", source], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "index" / "demo.parquet").is_file() and (tmp_path / "chip.npz").is_file()
