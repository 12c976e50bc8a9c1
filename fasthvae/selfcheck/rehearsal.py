"""The CPU rehearsal's set-up: a copy of the tree as the GPU machine receives it (tracked files and
untracked ones git does not ignore; no install), and the optional packages that machine lacks
hidden from the import system, in the check's own process and in every step's."""

import shutil
import subprocess
from pathlib import Path

HIDE_ENV = "FASTHVAE_HIDE_MODULES"

# Imported by every Python process of a step (it is first on PYTHONPATH): hides the modules named
# in FASTHVAE_HIDE_MODULES, and their submodules, as if they were not installed.
_FINDER = '''
import os
import sys


class HiddenModules:
    """A meta-path finder that makes importing the named modules fail as if they were absent."""

    def __init__(self, names):
        self.names = tuple(names)

    def hides(self, name):
        return any(name == hidden or name.startswith(hidden + ".") for hidden in self.names)

    def find_spec(self, name, path=None, target=None):
        if self.hides(name):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the rehearsal)", name=name)
        return None


def hide(names):
    """Install the finder (once) and forget the hidden modules already imported; returns it."""
    finder = next((f for f in sys.meta_path if isinstance(f, HiddenModules)), None)
    if names and finder is None:
        finder = HiddenModules(names)
        sys.meta_path.insert(0, finder)
        for name in [name for name in sys.modules if finder.hides(name)]:
            del sys.modules[name]
    return finder


hide([n for n in os.environ.get("FASTHVAE_HIDE_MODULES", "").split(",") if n])
'''


def copy_tree(root: Path, dest: Path, with_extension: bool) -> Path:
    """Copy the checkout's files as the GPU machine gets them; ``with_extension`` also copies the
    built ``fasthvae._C`` (git ignores it) for a rehearsal that does not build."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.decode()
    if dest.exists():
        shutil.rmtree(dest)
    names = [name for name in files.split("\0") if name and (root / name).is_file()]
    if with_extension:
        names += [str(p.relative_to(root)) for p in (root / "fasthvae").glob("_C*.so")]
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    return dest


def hiding_environment(folder: Path, tree: Path, hidden: tuple[str, ...]) -> dict[str, str]:
    """The environment of a rehearsal step: ``folder`` (holding the finder as sitecustomize.py), then
    the tree, on PYTHONPATH, and the modules to hide."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_FINDER)
    return {"PYTHONPATH": f"{folder}:{tree}", HIDE_ENV: ",".join(hidden)}


def hide_in_this_process(folder: Path, hidden: tuple[str, ...]) -> None:
    """Install the same finder here, so the check reports packages as its steps see them."""
    namespace: dict = {}
    exec(compile((folder / "sitecustomize.py").read_text(), "sitecustomize.py", "exec"), namespace)
    namespace["hide"](list(hidden))
