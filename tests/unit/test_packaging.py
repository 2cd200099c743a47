"""The built wheel, on its own, gives twistd the txfaas plugins (slowish: builds and installs a wheel).

The editable install hides packaging mistakes (``packages = find:`` leaving ``twisted.plugins`` out,
a stray ``twisted/plugins/__init__.py`` shadowing Twisted's own plugins), so this builds the wheel,
installs it into an empty directory and runs ``python -m twisted --help`` from there, with neither the
repository nor the development ``.pth`` files on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import twisted

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ("faas-gateway", "faas-worker", "faas-watchdog")
# What the build reads; copied so the build neither writes build/ and *.egg-info into the shared tree
# nor picks up stale modules a previous build left in build/lib.
_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    "dropin.cache",
    ".*_cache",
    "_trial_temp",
)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=180, **kwargs)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=_IGNORE)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(base / "dist"), str(source)]
    )
    (built,) = (base / "dist").glob("txfaas-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("target")
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)]
    )
    return target


def _isolated(target: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the interpreter with ``-S``: no site-packages, so no .pth (neither the editable finder
    nor ``zz_txfaas_dev_plugins.pth``); only the wheel's target and the dependencies' directory."""
    dependencies = Path(twisted.__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(dependencies)])
    return _run([sys.executable, "-S", *args], env=env, cwd=str(cwd))


def test_wheel_contains_the_plugin_module_but_no_twisted_package_inits(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/txfaas_plugins.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert "txfaas/__init__.py" in names
    for package in ("store", "queue", "gateway", "worker", "watchdog"):
        assert f"txfaas/{package}/__init__.py" in names


def test_wheel_alone_makes_twistd_help_list_the_txfaas_plugins(installed, tmp_path):
    help_text = _isolated(installed, ["-m", "twisted", "--help"], tmp_path).stdout
    listed = {line.split()[0] for line in help_text.splitlines() if line.startswith("    ") and line.strip()}
    assert set(PLUGINS) <= listed, help_text
    assert "web" in listed  # Twisted's own plugins are still found next to ours


def test_wheel_alone_makes_twistd_offer_the_txfaas_reactor(installed, tmp_path):
    probe = (
        "import sys; sys.argv = ['twistd', '--reactor=txfaas-epoll', '--help']\n"
        "from twisted.application.reactors import getReactorTypes\n"
        "print(sorted(r.shortName for r in getReactorTypes()))\n"
        "from twisted.application.reactors import installReactor\n"
        "print(type(installReactor('txfaas-epoll')).__module__)\n"
    )
    out = _isolated(installed, ["-c", probe], tmp_path).stdout.splitlines()
    assert "txfaas-epoll" in out[0] and "epoll" in out[0]
    assert out[1] == "txfaas._accel.reactor"


def test_isolated_interpreter_sees_only_the_installed_wheel(installed, tmp_path):
    probe = (
        "import json, sys, txfaas, twisted.plugins.txfaas_plugins as p\n"
        "from twisted.plugin import IPlugin, getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "names = sorted(m.tapname for m in getPlugins(IServiceMaker))\n"
        "print(json.dumps({'path': sys.path, 'txfaas': txfaas.__file__, 'plugin': p.__file__, 'names': names}))\n"
    )
    seen = json.loads(_isolated(installed, ["-c", probe], tmp_path).stdout)
    assert Path(seen["txfaas"]).is_relative_to(installed)
    dependencies = Path(twisted.__file__).resolve().parent.parent
    if (dependencies / "twisted" / "plugins" / "txfaas_plugins.py").exists():
        # CI (scripts/test) installs txfaas's own wheel beside its dependencies, and
        # twisted.plugins' own directory comes first on its __path__: that copy is a wheel too.
        assert Path(seen["plugin"]).is_relative_to(installed) or Path(seen["plugin"]).is_relative_to(
            dependencies
        )
    else:
        assert Path(seen["plugin"]).is_relative_to(installed)
    assert not any(entry and Path(entry).resolve() == ROOT for entry in seen["path"])
    assert set(PLUGINS) <= set(seen["names"])
