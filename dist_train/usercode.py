"""The user's own code, named in a config by import path ('package.module:name'): importing
it, calling a factory with what it asks for, where its modules are found, and shipping
them to Spark executors.

A module is found on sys.path, which for every launcher holds the config file's directory
(`search_config_dir`) as well as PYTHONPATH; `dist-train spark` and the notebook API ship
a module that is a local file (or a local package, zipped) to the executors.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from . import config
from .errors import ConfigError, UserError


def load(target: str, key: str):
    """'package.module:attr' -> the object, or a ConfigError naming `key` and what failed."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(key, f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    found = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ConfigError(key, f"module {module_name!r} has no attribute {attr!r}")
    if not callable(found):
        raise ConfigError(key, f"{target} is not callable")
    return found


def call(factory, key: str, kwargs: dict, **offered):
    """`factory(**kwargs, **the offered keywords its signature takes)`; a ConfigError naming
    `key` if it raises. Offered keywords set explicitly in `kwargs` are the user's."""
    try:
        params = inspect.signature(factory).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # a builtin without a signature: offer nothing
        params, takes_all = {}, False
    extra = {k: v for k, v in offered.items() if (takes_all or k in params) and k not in kwargs}
    try:
        return factory(**kwargs, **extra)
    except Exception as e:  # noqa: BLE001 - the user's code: one line naming it
        name = getattr(factory, "__qualname__", type(factory).__name__)
        raise ConfigError(key, f"{name}(**{key.split('.')[0]}.kwargs) raised {type(e).__name__}: {e}") from None


def search_config_dir(config_path) -> None:
    """Modules beside the config file import as they would beside a script."""
    if config_path is None or isinstance(config_path, dict):
        return
    where = str(Path(config_path).resolve().parent)
    if where not in sys.path:
        sys.path.insert(0, where)


def targets(cfg) -> list[tuple[str, str]]:
    """Every (key, 'module:name') of user code a config names."""
    found = [(k, v) for k, v in (("model.target", cfg.model.target), ("data.target", cfg.data.target),
                                 ("data.collate", cfg.data.collate), ("train.loss", cfg.train.loss),
                                 ("train.optimizer", cfg.train.optimizer)) if v and config.is_target(v)]
    found += [("train.metrics", m) for m in cfg.train.metrics or () if config.is_target(m)]
    return found


def refuse_untrusted(cfg, where: str, trusted: bool) -> None:
    """A finished run's config may name any module: importing it runs its code. Refuse
    unless the user says they trust it."""
    named = targets(cfg)
    if named and not trusted:
        key, target = named[0]
        raise UserError(f"{where} names user code ({key}: {target}): it would import "
                        f"{target.partition(':')[0]!r}; pass --trust-code if you trust this run")


def _installed_roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return [os.path.realpath(r) for r in roots | {sys.prefix, sys.base_prefix}]


def local_files(cfg) -> list[Path]:
    """The files to ship to Spark executors for the user code `cfg` names: each top-level
    module that is a local file as it is, a local package as a zip (in the temp directory).
    Code installed in the environment (site-packages, the standard library) is not shipped."""
    files, roots = [], _installed_roots()
    for _, target in targets(cfg):
        top = target.partition(":")[0].split(".")[0]
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue  # import fails on the driver too, with its own message
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
            continue
        origin = Path(os.path.realpath(spec.origin))
        if any(str(origin).startswith(r + os.sep) for r in roots):
            continue
        path = _zip_package(origin.parent, top) if spec.submodule_search_locations else origin
        if path not in files:
            files.append(path)
    return files


def _zip_package(package_dir: Path, name: str) -> Path:
    out = Path(tempfile.gettempdir()) / f"dist-train-{name}-{os.getpid()}.zip"
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(package_dir.rglob("*.py")):
            z.write(f, Path(name) / f.relative_to(package_dir))
    return out
