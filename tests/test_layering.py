"""Project structure contracts: the library stays free of the CLI layer; the CLI has every designed command."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import blip
from blipctl.cli import app

DESIGNED = [
    "pretrain",
    "finetune-captioner",
    "finetune-filter",
    "capfilt",
    "eval-retrieval",
    "eval-caption",
    "caption",
    "score",
    "run",
    "data",
    "export",
]


def test_blip_never_imports_cli_layer():
    mods = [m.name for m in pkgutil.walk_packages(blip.__path__, "blip.")]
    assert len(mods) > 8
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('typer', 'rich', 'blipctl', 'click'))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"blip/ pulled in: {r.stdout}"


def test_cli_has_every_designed_command():
    import typer.main

    group = typer.main.get_command(app)
    assert set(DESIGNED) <= set(group.commands), set(DESIGNED) - set(group.commands)
    for name, cmd in group.commands.items():
        assert cmd.help or getattr(cmd, "short_help", None), f"{name} has no help text"


def test_cli_layer_imports_only_blip_typer_rich_and_the_standard_library():
    """blipctl/ parses flags, makes one library call and prints: no torch (no model, batch or process group)."""
    import ast
    from pathlib import Path

    import blipctl

    allowed = {"blip", "blipctl", "typer", "rich", "click", "__future__"} | set(sys.stdlib_module_names)
    files = sorted(Path(blipctl.__file__).parent.rglob("*.py"))
    assert len(files) > 8
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{f.name}: {n}" for n in names if n.split(".")[0] not in allowed]
    assert not bad, bad


def test_no_test_file_imports_another():
    """Shared test code lives in tests/helpers.py: a test module imported by another runs its tests twice and ties
    unrelated files together."""
    import ast
    from pathlib import Path

    here = Path(__file__).parent
    tests = {p.stem for p in here.glob("test_*.py")}
    bad = []
    for path in sorted(here.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{path.name} imports {n}" for n in names if n.split(".")[-1] in tests]
    assert len(tests) > 20 and not bad, bad


def test_cli_start_up_does_not_import_torch():
    """`blipctl --help` registers every command; building their options must not load torch (seconds, not 0.1 s)."""
    code = (
        "import sys, typer\n"
        "from blipctl.registry import register_all\n"
        "register_all(typer.Typer())\n"
        "print(','.join(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'timm', 'transformers'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"CLI start-up pulled in: {r.stdout.strip()[:200]}"
