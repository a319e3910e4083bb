"""The package list for setuptools; everything else is in pyproject.toml.

Besides the ``ssl_vision`` packages, the wheel carries the Hydra configs (``conf/``) and the entry scripts
(``tools/``) as ``ssl_vision/_resources/conf`` and ``ssl_vision/_resources/tools``, so the console commands
(``ssl-pretrain`` ..., ``ssl_vision/console.py``) run from an installed wheel as from a checkout. Every ``conf/``
sub-folder is a config group; they are found here rather than listed, so a new group is installed too.
"""

from setuptools import find_namespace_packages, find_packages, setup

RESOURCES = "ssl_vision._resources"


def packages() -> list[str]:
    conf = [f"{RESOURCES}.conf"] + [f"{RESOURCES}.conf.{p}" for p in find_namespace_packages("conf")]
    return find_packages(include=["ssl_vision", "ssl_vision.*"]) + conf + [f"{RESOURCES}.tools"]


if __name__ == "__main__":
    setup(
        packages=packages(),
        package_dir={f"{RESOURCES}.conf": "conf", f"{RESOURCES}.tools": "tools"},
        package_data={"": ["*.yaml"]},
        include_package_data=False,
    )
