"""Docs that cannot rot: the README's Python runs, every --flag in README.md and docs/ exists in the
command it is written after, the options page is generated from the config, every test the docs
name exists, and the project's text speaks of the project (not of how it was made)."""

import contextlib
import io
import re
import runpy
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from fasthvae.training.config import options_page
from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What a command's first words name -> the module whose --help lists its flags (None: not checked).
MODULES = {
    ("fasthvae", "train"): "fasthvae.train",
    ("fasthvae", "eval"): "fasthvae.eval",
    ("fasthvae", "study"): "fasthvae.study",
    ("fasthvae", "bench"): None,  # followed by ops|train|loader: see _command
    ("bash", "scripts/gpu_check.sh"): "fasthvae.selfcheck",
    ("bash", "scripts/test.sh"): "pytest",
}
CODE = re.compile(r"```(\w*)\n(.*?)```|`([^`\n]+)`", re.S)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _command(words: list[str]) -> str | None:
    """The module a command line runs, '' for a program whose flags are not checked, None when the
    words are not a command at all."""
    if "-m" in words[:-1]:
        return words[words.index("-m") + 1]
    first = words[0].rsplit("/", 1)[-1]
    if first == "fasthvae" and len(words) > 1:
        if words[1] == "bench" and len(words) > 2:
            return f"bench.bench_{words[2]}"
        return MODULES.get((first, words[1]), "")
    if first == "bash" and len(words) > 1:
        return MODULES.get(("bash", words[1]), "")
    if first in ("python", "python3", "pip", "torchrun", "nvcc", "cuobjdump", "tensorboard", "export"):
        return ""
    return None


def mentions(page: Path) -> list[tuple[str, str]]:
    """(module, flag) for every --flag in ``page``'s code, paired with the last command before it."""
    found, current = [], ""
    for match in CODE.finditer(page.read_text()):
        block = match.group(2) if match.group(2) is not None else match.group(3)
        for line in block.replace("\\\n", " ").splitlines():
            words = [w for w in re.split(r"[\s\[\]()]+", line.split("#")[0].strip()) if w]
            words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]  # VAR=value before a command
            if not words:
                continue
            command = _command(words)
            if command is not None:
                current = command
            for flag in FLAG.findall(line.split("#")[0]):
                if current:
                    found.append((current, flag))
    return found


@cache
def help_text(module: str) -> str:
    """``python -m module --help``: run in this process (the modules are imported already), pytest's
    in a subprocess (its help lists the options of this repository's conftest.py)."""
    if module == "pytest":
        command = [sys.executable, "-m", "pytest", "--help"]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    out, argv = io.StringIO(), sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = argv
    return out.getvalue()


def test_every_flag_in_the_docs_exists_in_its_command():
    found = {(page.name, module, flag) for page in PAGES for module, flag in mentions(page)}
    helps = {module: help_text(module) for module in sorted({module for _, module, _ in found})}
    assert all(helps.values()), [m for m, text in helps.items() if not text]
    missing = sorted(
        f"{page}: {flag} ({module})" for page, module, flag in found if flag not in helps[module]
    )
    assert not missing, sorted(missing)


def test_the_flag_check_reads_commands_and_prose():
    page = Path(__file__).parent / "docs-probe.md"
    try:
        page.write_text(
            "Run `python -m fasthvae.train --amp` and read `--kl-warmup W`.\n\n"
            "```bash\nFASTHVAE_BUILD_CUDA=1 pip install --no-build-isolation -e .\n"
            "fasthvae bench ops --isa avx2   # a comment --ignored\n```\n"
        )
        assert mentions(page) == [
            ("fasthvae.train", "--amp"), ("fasthvae.train", "--kl-warmup"), ("bench.bench_ops", "--isa")
        ]  # fmt: skip
    finally:
        page.unlink()


def test_the_readme_python_snippets_run():
    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert snippets
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {})


def test_the_options_page_is_generated_from_the_config():
    """docs/options.md is `python -m fasthvae.training.config`'s output: no option can drift."""
    assert (ROOT / "docs" / "options.md").read_text() == options_page()


def test_the_tests_the_docs_name_exist():
    defined = {
        name
        for path in (ROOT / "tests").glob("*.py")
        for name in re.findall(r"def (test_\w+)", path.read_text())
    }
    named = {name for page in PAGES for name in re.findall(r"\b(test_\w+)(?![\w.])", page.read_text())}
    assert named <= defined, sorted(named - defined)


@pytest.mark.parametrize("folder", ["README.md", "docs", "fasthvae", "results", "CHANGELOG.md"])
def test_the_project_speaks_of_itself(folder):
    """No session counts or issue numbers in the project's text."""
    pattern = re.compile(r"\b(?:sessions?|issue \d+|issue's)\b", re.I)
    paths = [ROOT / folder] if (ROOT / folder).is_file() else sorted((ROOT / folder).rglob("*"))
    hits = []
    for path in paths:
        if path.suffix in (".md", ".py", ".txt", ".cpp", ".h", ".cu") and path.is_file():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line.replace("start_new_session", "")):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, hits


def test_the_links_between_pages_resolve():
    pages = [*PAGES, ROOT / "CHANGELOG.md", *sorted((ROOT / "results").rglob("README.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
