"""Package discovery beside pyproject.toml (which holds everything else).

The config files live in the top-level configs/ (README commands use `configs/demo.py`) and ship inside the
package as `mmlm._configs`, so an installed wheel resolves `--config demo` (`mmlm.configs`). pyproject.toml
cannot map a directory outside the package into it while also discovering the package's subpackages.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["mmlm*"]) + ["mmlm._configs", "mmlm._configs.experiments"],
    package_dir={"mmlm._configs": "configs"},
)
