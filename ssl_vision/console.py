"""Console commands (``[project.scripts]`` in pyproject.toml): the ``tools/`` scripts, runnable from any directory.

=================  ==========================  ==================
command            runs                        config
=================  ==========================  ==================
``ssl-pretrain``   ``tools/pretrain.py``       conf/pretrain.yaml
``ssl-knn``        ``tools/knn_eval.py``       conf/knn.yaml
``ssl-linear``     ``tools/linear_probe.py``   conf/linear.yaml
``ssl-export``     ``tools/export.py``         conf/export.yaml
``ssl-embed``      ``tools/embed_plot.py``     conf/embed.yaml
``ssl-compare``    ``tools/compare.py``        (argparse)
=================  ==========================  ==================

Each takes the same arguments as the script (``ssl-pretrain method=byol data=cifar10 data.root=...``,
``ssl-pretrain --cfg job``). The scripts give Hydra a config path relative to their own file (``../conf``); a
console command runs the script's task function under ``hydra.main`` with the absolute path of the config folder
instead, so it resolves whatever the working directory. ``conf/`` and ``tools/`` are those of the source checkout
the package is imported from (an editable install), or else the copies installed with the package
(``ssl_vision/_resources/``, see setup.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: console command -> (tools/ script, Hydra config name, or None for an argparse tool)
COMMANDS: dict[str, tuple[str, str | None]] = {
    "ssl-pretrain": ("pretrain", "pretrain"),
    "ssl-knn": ("knn_eval", "knn"),
    "ssl-linear": ("linear_probe", "linear"),
    "ssl-export": ("export", "export"),
    "ssl-embed": ("embed_plot", "embed"),
    "ssl-compare": ("compare", None),
}


def resources_root() -> Path:
    """The folder holding ``conf/`` and ``tools/``: the source checkout, else the copy installed in the package."""
    package = Path(__file__).resolve().parent
    candidates = (package.parent, package / "_resources")
    for root in candidates:
        if (root / "conf" / "pretrain.yaml").is_file() and (root / "tools" / "pretrain.py").is_file():
            return root
    raise FileNotFoundError(
        f"ssl_vision's conf/ and tools/ folders were not found in {candidates[0]} (a source "
        f"checkout) nor in {candidates[1]} (an installed wheel); reinstall the package "
        f"(pip install <checkout> or pip install -e <checkout>)"
    )


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as the module ``ssl_vision._resources.tools.<name>`` (Hydra names the job after its last
    part, as it does for the script)."""
    module_name = f"ssl_vision._resources.tools.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    try:  # importable in a wheel, or in an install that maps it to the checkout's tools/: a job pickled by
        return importlib.import_module(module_name)  # reference (hydra/launcher=submitit_*) is then found again
    except ModuleNotFoundError as err:
        if err.name not in (module_name, "ssl_vision._resources", "ssl_vision._resources.tools"):
            raise  # a missing dependency of the tool, not a missing tool
    path = resources_root() / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _run_hydra_tool(command: str):
    import hydra

    name, config_name = COMMANDS[command]
    task = load_tool(name).main.__wrapped__  # the script's task function, without its relative config path
    conf = str(resources_root() / "conf")
    return hydra.main(config_path=conf, config_name=config_name, version_base="1.3")(task)()


def pretrain():
    """``ssl-pretrain``: ``tools/pretrain.py``."""
    return _run_hydra_tool("ssl-pretrain")


def knn_eval():
    """``ssl-knn``: ``tools/knn_eval.py``."""
    return _run_hydra_tool("ssl-knn")


def linear_probe():
    """``ssl-linear``: ``tools/linear_probe.py``."""
    return _run_hydra_tool("ssl-linear")


def export():
    """``ssl-export``: ``tools/export.py``."""
    return _run_hydra_tool("ssl-export")


def embed_plot():
    """``ssl-embed``: ``tools/embed_plot.py``."""
    return _run_hydra_tool("ssl-embed")


def compare():
    """``ssl-compare``: ``tools/compare.py`` (argparse; it finds conf/ and tools/ beside itself)."""
    load_tool("compare").main()
