"""What each entry point imports: the patch path must not pay for modules it never uses.

Each check runs a fresh interpreter and lists ``sys.modules`` afterwards (no timing: the cost of an import is
measured in scripts/bench.py; here only *whether* it happens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from patcher import synth

#: Modules only a dry run, an error message, a merge, a zipped install or the network needs.
NOT_ON_THE_PATCH_PATH = (
    "difflib",
    "importlib.resources",
    "zipfile",
    "numpy",
    "huggingface_hub",
    "patcher.merge",
)
#: The same for a whole command-line patch (the post-write check uses the project's reader: no numpy), and what
#: only the network, a long file name, shell completion or a listing of tensors needs.
NOT_ON_THE_PATCH_PATH_CLI = (
    *NOT_ON_THE_PATCH_PATH,
    "safetensors",
    "logging",
    "socket",
    "secrets",
    "random",
    "shlex",
    "click.shell_completion",
    "patcher.tensors",
)


def modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Return the names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    program = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, env=env)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_package_imports_its_modules_on_first_use() -> None:
    loaded = modules_after("import patcher")
    assert not {name for name in loaded if name.startswith("patcher.")}
    loaded = modules_after("import patcher.header")
    loaded_here = {name for name in loaded if name.startswith("patcher.")}
    assert loaded_here == {"patcher.header", "patcher.errors", "patcher._record"}
    # The public names still resolve.
    loaded = modules_after("from patcher import write_metadata, read_header, validate_metadata, __version__")
    assert {"patcher.splice", "patcher.header", "patcher.contract"} <= loaded


def test_planning_a_patch_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    path = synth.write_sparse(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", synth.flux_dev_int4_r32())
    code = (
        "from patcher.header import read_header\n"
        "from patcher.plan import PatchOptions, Planner\n"
        "import patcher.splice, patcher.report\n"
        f"header = read_header({str(path)!r})\n"
        "plan = Planner(PatchOptions(model='flux.1-dev'), log=lambda line: None).plan('x', header)\n"
        "assert plan.changed and plan.config_source.startswith('embedded')\n"
    )
    # An empty Hugging Face cache: the embedded config is used (a cache holding the model imports the hub).
    loaded = modules_after(code, env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    unexpected = sorted(
        name for name in loaded if any(name == top or name.startswith(f"{top}.") for top in NOT_ON_THE_PATCH_PATH)
    )
    assert not unexpected


@pytest.mark.parametrize("what", ["diff", "suggestion"])
def test_the_lazy_imports_still_work(what: str) -> None:
    code = {
        "diff": "from patcher.metadata import diff_metadata\nassert diff_metadata({'a': '1'}, {'a': '2'})",
        "suggestion": (
            "from patcher import models\n"
            "try:\n    models.lookup('flux.1-devv')\nexcept Exception as exc:\n    assert 'flux.1-dev' in str(exc)\n"
            "else:\n    raise AssertionError('an unknown name was accepted')"
        ),
    }[what]
    assert "difflib" in modules_after(code)


def test_a_command_line_patch_loads_the_patch_path_only(tmp_path: Path) -> None:
    path = synth.write_sparse(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", synth.flux_dev_int4_r32())
    code = (
        "import sys\n"
        f"sys.argv = ['nunchaku-patch', {str(path)!r}, '--model', 'flux.1-dev', '--json']\n"
        "from patcher.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
    )
    loaded = modules_after(code, env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert "patcher.splice" in loaded  # it did patch
    others = {f"patcher.cli.{name}" for name in ("merge", "inspect", "validate", "restore")}
    unexpected = sorted(
        name
        for name in loaded
        if name in others or any(name == top or name.startswith(f"{top}.") for top in NOT_ON_THE_PATCH_PATH_CLI)
    )
    assert not unexpected
