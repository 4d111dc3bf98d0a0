"""Typed config: every key, its type, its default and what it means, in one table.

A run's config is these defaults, overridden by a YAML file from `conf/`, overridden
by `--set key=value` on the command line (values parsed as YAML: `0.05` is a float,
`[64,64]` a list, `true` a bool). Anything unknown, mistyped or impossible raises a
`ConfigError` naming the key, before any worker starts.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError

@dataclass(frozen=True)
class Key:
    name: str
    type: type | tuple  # int, float, bool, str, list (of ints), dict
    default: Any
    help: str
    choices: tuple = ()
    optional: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a problem, or None


def _positive(v):
    return None if v > 0 else f"must be > 0, got {v}"


def _non_negative(v):
    return None if v >= 0 else f"must be >= 0, got {v}"


def _fraction(v):
    return None if 0 <= v < 1 else f"must be in [0, 1), got {v}"


def _seed(v):
    if not 0 <= v < 2 ** 63:
        return f"must be in [0, 2**63), got {v}"
    return None


def _positive_ints(v):
    bad = [w for w in v if not isinstance(w, int) or isinstance(w, bool) or w <= 0]
    return f"must be a list of positive integers, got {v}" if bad else None


def _tensorboard(v):
    import importlib.util

    if v and importlib.util.find_spec("tensorboard") is None:
        return "needs the tensorboard package: pip install 'dist-train[tensorboard]'"
    return None


def _mlflow(v):
    import importlib.util

    if v and importlib.util.find_spec("mlflow") is None:
        return "needs the mlflow package: pip install 'dist-train[mlflow]'"
    return None


def _device(v):
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return f"must be auto, cpu, cuda or cuda:N, got {v!r}"


def _target(v):
    return None if is_target(v) else f"must look like 'package.module:factory', got {v!r}"


def is_target(v) -> bool:
    """'package.module:name': user code by import path."""
    mod, sep, attr = str(v).partition(":")
    return bool(sep and mod.strip() and attr.strip())


BUILTIN_LOSSES = ("cross_entropy", "mse", "bce")
BUILTIN_METRICS = ("accuracy", "topK (top5, ...)", "mae", "mse")


def _loss(v):
    if v in BUILTIN_LOSSES or is_target(v):
        return None
    return f"must be one of {', '.join(BUILTIN_LOSSES)} or 'package.module:fn', got {v!r}{_nearest_choice(v, BUILTIN_LOSSES)}"


def _metrics(v):
    for m in v:
        if not isinstance(m, str) or not (m in ("accuracy", "mae", "mse") or re.fullmatch(r"top[1-9]\d*", m)
                                          or is_target(m)):
            close = _nearest_choice(m, ("accuracy", "top5", "mae", "mse"))
            return f"unknown metric {m!r}: use accuracy, topK (top5, ...), mae, mse or 'package.module:fn'{close}"
    return None


def _optimizer(v):
    """Any torch.optim class by name (any case), or an import path."""
    if is_target(v) or v.lower() in ALWAYS_OPTIMIZERS:
        return None  # no torch import: `dist-train spark` checks a config before spark-submit starts
    names = optimizer_names()
    if v.lower() in names:
        return None
    close = difflib.get_close_matches(v.lower(), list(names), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown optimizer {v!r}: a torch.optim class ({', '.join(sorted(names))}) or 'package.module:Class'{hint}"


# in torch.optim in every torch this project accepts (2.2 on); newer ones (adafactor, muon) are looked up
ALWAYS_OPTIMIZERS = ("adadelta", "adagrad", "adam", "adamax", "adamw", "asgd", "lbfgs", "nadam", "radam",
                     "rmsprop", "rprop", "sgd", "sparseadam")


def optimizer_names() -> dict[str, str]:
    """lower-case name -> torch.optim class name, for every optimizer torch.optim offers."""
    import torch.optim

    return {name.lower(): name for name in dir(torch.optim)
            if isinstance(getattr(torch.optim, name), type) and issubclass(getattr(torch.optim, name),
                                                                          torch.optim.Optimizer)
            and name != "Optimizer"}


KEYS: tuple[Key, ...] = (
    Key("seed", int, 0, "seeds model init, data order and synthetic data; same seed, same weights", check=_seed),
    Key("device", str, "auto", "auto (a GPU per worker if there are enough, else cpu), cpu, cuda (one GPU per "
        "worker of a host, by local rank) or cuda:N (that GPU; one worker a host)", check=_device),
    Key("threads", int, None, "torch threads per worker; null = the cores given / workers on this host",
        optional=True, check=_positive),
    # model
    Key("model.name", str, "mlp", "built-in model; ignored when model.target is set", ("perceptron", "mlp", "lenet")),
    Key("model.hidden", list, [64], "hidden layer widths of the mlp", check=_positive_ints),
    Key("model.outputs", int, None, "output width of a built-in model; null = from the data (classes or target width)",
        optional=True, check=_positive),
    Key("model.target", str, None, "user model as 'package.module:factory' returning a torch.nn.Module; the "
        "factory also gets input_shape and outputs where its signature takes them", optional=True, check=_target),
    Key("model.kwargs", dict, {}, "keyword arguments for model.target's factory"),
    # data
    Key("data.name", str, "digits", "built-in dataset or file format",
        ("xor", "perceptron", "digits", "synthetic", "npz", "parquet")),
    Key("data.target", str, None, "user dataset as 'package.module:factory' returning a map-style dataset "
        "(__len__, __getitem__(i) -> (inputs, target)); data.name is then ignored", optional=True, check=_target),
    Key("data.kwargs", dict, {}, "keyword arguments for data.target's factory"),
    Key("data.collate", str, None, "data.target: 'package.module:fn' making a batch of a list of items "
        "(default: torch's default_collate)", optional=True, check=_target),
    Key("data.workers", int, 0, "data.target: processes per worker that fetch and transform items ahead of "
        "the step (0: in the worker itself)", check=_non_negative),
    Key("data.path", str, None, "file for data.name npz (.npz with arrays x, y) or parquet (file or directory)",
        optional=True),
    Key("data.sampling", str, "shard", "shard: each worker shuffles its own fixed shard; global: each step is a "
        "slice of one global permutation (same result as local mode)", ("shard", "global")),
    Key("data.shuffle_window", int, 0, "rows shuffled together: 0 = all of a worker's rows; N = windows of N "
        "consecutive rows, visited in a shuffled order and each shuffled within itself, the next one read ahead "
        "from disk in one sequential span (data larger than memory; a worker keeps up to two windows' rows "
        "mapped, at least data.resident_mb)",
        check=_non_negative),
    Key("data.eval_fraction", float, 0.2, "fraction of rows held out for evaluation (chosen by seed)", check=_fraction),
    Key("data.size", int, 10000, "synthetic: number of samples", check=_positive),
    Key("data.classes", int, 10, "synthetic: number of classes", check=_positive),
    Key("data.shape", list, [1, 28, 28], "synthetic: shape of one sample", check=_positive_ints),
    Key("data.label_column", str, "label", "parquet: the label column; every other column is a feature"),
    Key("data.label_map", list, None, "string labels (npz, Parquet): the class names in class-id order; null = "
        "their sorted distinct values, found at load; kept in model.pt, so predict writes the names", optional=True),
    Key("data.cache_dir", str, None, "local directory for the on-disk copy of a worker's rows (Parquet, Spark "
        "partitions); null = spark.local.dir under Spark, else the system's temporary directory", optional=True),
    Key("data.resident_mb", int, 64, "MB of a worker's on-disk rows it keeps mapped in memory; beyond that the "
        "pages are given back (a row read again costs a page fault, ~7 us); 0 = keep all (the page cache decides)",
        check=_non_negative),
    # train
    Key("train.epochs", int, 10, "passes over the training rows", check=_positive),
    Key("train.batch_size", int, 64, "global batch: samples per step summed over all workers", check=_positive),
    Key("train.optimizer", str, "sgd", "any torch.optim class by name, any case (sgd, adam, adamw, rmsprop, ...), "
        "or 'package.module:Class'", check=_optimizer),
    Key("train.optimizer_kwargs", dict, {}, "more keyword arguments for the optimizer (betas, eps, nesterov, ...)"),
    Key("train.lr", float, 0.1, "learning rate", check=_positive),
    Key("train.momentum", float, 0.0, "momentum, for the optimizers that take one (sgd, rmsprop, muon)",
        check=_fraction),
    Key("train.weight_decay", float, 0.0, "L2 weight decay", check=_non_negative),
    Key("train.loss", str, "cross_entropy", "cross_entropy, mse, bce, or 'package.module:fn' with fn(outputs, "
        "targets) -> one loss per sample; summed, then divided by the global batch's sample count", check=_loss),
    Key("train.metrics", list, None, "metrics logged in training and evaluation, each summed exactly over "
        "workers: accuracy, topK (top5, ...), mae, mse, 'package.module:fn'; null = accuracy for cross_entropy "
        "and bce, none otherwise", optional=True, check=_metrics),
    Key("train.schedule", str, "constant", "learning-rate schedule after warmup", ("constant", "cosine", "step")),
    Key("train.warmup_steps", int, 0, "linear warmup from 0 to the full lr over this many steps", check=_non_negative),
    Key("train.decay_every", int, 1000, "step schedule: multiply the lr by train.decay_factor every N steps",
        check=_positive),
    Key("train.decay_factor", float, 0.1, "step schedule: the factor", check=_positive),
    Key("train.lr_scaling", str, "none", "scale lr with the effective global batch relative to train.base_batch",
        ("none", "linear", "sqrt")),
    Key("train.base_batch", int, 64, "the batch that train.lr was tuned for (with lr_scaling)", check=_positive),
    Key("train.accumulate", int, 1, "micro-batches of train.batch_size summed per optimizer step; "
        "workers communicate once per step, after the last", check=_positive),
    Key("train.precision", str, "fp32", "forward/backward in bf16 or fp16 autocast; gradients and the fused "
        "buffers stay float32 (fp16: a loss scaler whose overflow decision is the same on every worker)",
        ("fp32", "bf16", "fp16")),
    Key("train.loss_scale", float, 65536.0, "fp16: the initial loss scale (halved on an overflow, doubled after "
        "train.loss_scale_growth_every good steps)", check=_positive),
    Key("train.loss_scale_growth_every", int, 2000, "fp16: good steps before the loss scale doubles",
        check=_positive),
    Key("train.shuffle", bool, True, "reshuffle the order every epoch (seeded by seed, epoch, rank)"),
    Key("train.log_every", int, 10, "write a metrics line every N steps (0: once per epoch)", check=_non_negative),
    Key("train.eval_every", int, None, "score the held-out rows every N steps and log it (kind: eval) in "
        "metrics.jsonl; null = at each epoch's end, 0 = only once training ends", optional=True,
        check=_non_negative),
    Key("log.tensorboard", bool, False, "also write the metrics as TensorBoard scalars to OUT/tensorboard",
        check=_tensorboard),
    Key("log.mlflow", bool, False, "track the run in MLflow: one run per job (rank 0 logs), params = the config, "
        "metrics at every logged step, the summary and model.pt; --resume continues the run", check=_mlflow),
    Key("log.mlflow_uri", str, None, "MLflow tracking URI; null = MLFLOW_TRACKING_URI, else MLflow's default",
        optional=True),
    Key("log.mlflow_experiment", str, "dist-train", "MLflow experiment the run goes to (made if missing)"),
    Key("train.target_loss", float, None, "stop once the globally averaged training loss of a step is <= this",
        optional=True, check=_non_negative),
    Key("train.skip_nonfinite", bool, False, "on a NaN/Inf loss on any worker, every worker skips that step "
        "(false: stop with an error naming the step and ranks)"),
    Key("train.max_steps", int, None, "stop after this many steps in all", optional=True, check=_positive),
    # checkpoint
    Key("checkpoint.every_steps", int, 0, "write a checkpoint every N steps (0: only at the end)", check=_non_negative),
    Key("checkpoint.keep", int, 3, "how many checkpoints to keep", check=_positive),
    # comm
    Key("comm.timeout_s", float, 300.0, "seconds a worker may stall or go silent (and a collective wait for it) "
        "before the job fails, naming it", check=_positive),
    Key("comm.check_every_steps", int, 100, "compare a checksum of the parameters across workers every N steps "
        "and stop if they drifted apart (0: never)", check=_non_negative),
    Key("comm.shm", bool, True, "workers on one host sum gradients in shared memory; MPI or gloo only "
        "between hosts (x86-64 Linux; false or elsewhere: MPI Allreduce / gloo throughout); CPU workers only"),
    Key("comm.share_gpus", bool, False, "device cuda/auto with more workers on a host than GPUs: share them "
        "round robin (gradients then go through host memory) instead of refusing"),
    Key("comm.nccl", bool, True, "workers each on a GPU of their own sum gradients with NCCL on the device "
        "(false: through host memory, as CPU workers do)"),
    # mpi
    Key("mpi.max_restarts", int, 0, "dist-train mpi: after a failure, start the job again from the newest "
        "checkpoint up to N times (--max-restarts; a plain mpirun cannot restart itself)", check=_non_negative),
    # spark
    Key("spark.workers", int, 2, "number of barrier tasks (the world size under Spark)", check=_positive),
    Key("spark.max_attempts", int, 1, "driver-side retries of the whole job from the newest checkpoint",
        check=_positive),
)

KEY_BY_NAME = {k.name: k for k in KEYS}
SECTIONS = sorted({k.name.split(".")[0] for k in KEYS if "." in k.name})


class Section(dict):
    """A dict whose keys read as attributes: cfg.train.lr."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def defaults() -> dict[str, Any]:
    return {k.name: _copy(k.default) for k in KEYS}


def _copy(v):
    return list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v


def _nearest(name: str) -> str:
    close = difflib.get_close_matches(name, list(KEY_BY_NAME) + SECTIONS, n=1, cutoff=0.6)
    if not close and "." in name:  # a typo in the section or the leaf alone
        leaf = name.rsplit(".", 1)[1]
        close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in KEY_BY_NAME], n=1, cutoff=0.75)
        close = [k for k in KEY_BY_NAME if k.rsplit(".", 1)[-1] == close[0]][:1] if close else []
    return f" (did you mean {close[0]}?)" if close else ""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        full = f"{prefix}{name}"
        if full in KEY_BY_NAME or not isinstance(value, dict):
            flat[full] = value
        else:
            if full not in SECTIONS:
                raise ConfigError(full, f"unknown section{_nearest(full)}")
            flat.update(_flatten(value, full + "."))
    return flat


def _check_type(key: Key, value: Any) -> Any:
    if value is None:
        if key.optional:
            return None
        raise ConfigError(key.name, "must not be null")
    want = key.type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is str and isinstance(value, (int, float)):  # a YAML number where a string is meant: a path 2024
        value = ("true" if value else "false") if isinstance(value, bool) else str(value)
    ok = isinstance(value, want) and not (want in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(key.name, f"must be {_type_name(want)}, got {type(value).__name__} {value!r}")
    if want is float and not math.isfinite(value):
        raise ConfigError(key.name, f"must be a finite number, got {value}")
    if key.choices and value not in key.choices:
        raise ConfigError(key.name, f"must be one of {', '.join(key.choices)}, got {value!r}"
                          f"{_nearest_choice(value, key.choices)}")
    if key.check is not None:
        problem = key.check(value)
        if problem:
            raise ConfigError(key.name, problem)
    return value


def _nearest_choice(value, choices) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "a mapping"}.get(t, str(t))


class _Loader(yaml.SafeLoader):
    """YAML as a user means it (YAML 1.2's core schema, not PyYAML's 1.1): `1e-3` is a
    number (1.1 wants `1.0e-3`), and only true/false are booleans (`on`, `no`, `y` stay strings)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader with other scalar rules


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=0.05' -> ('train.lr', 0.05); the value is parsed as YAML, except that a
    string key's value is taken as written (a path `2024`, a name `on`, `my #1.npz`)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError("", f"--set expects KEY=VALUE, got {text!r}")
    key = KEY_BY_NAME.get(name)
    if key is not None and key.type is str and raw.strip() and not raw.strip().startswith(("'", '"')) \
            and raw.strip().lower() not in ("null", "~"):
        return name, raw.strip()
    if (" #" in raw or raw.lstrip().startswith("#")) and not raw.strip().startswith(("'", '"')):
        raise ConfigError(name, f"--set value {raw!r}: '#' starts a YAML comment, which would cut it short; "
                                f"quote the value (--set '{name}=\"...\"')")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the string as written
    return name, value


def load(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Section:
    """Defaults <- YAML file <- overrides, validated. Raises ConfigError."""
    values = defaults()
    if path is not None:
        values.update(_flatten(read_yaml(path)))
    for text in overrides:
        name, value = parse_override(text)
        values[name] = value
    return build(values)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError("", f"config file {path} is a directory; give the YAML file in it")
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    try:
        tree = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("", f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("", f"cannot read {path}: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError("", f"{path}: must be a mapping of keys to values, got {type(tree).__name__}")
    return tree


def build(flat: dict[str, Any], check_files: bool = True) -> Section:
    """Validate a flat {dotted key: value} mapping (defaults filled in) into a Section tree.
    `check_files=False` skips checking that data.path exists (a finished run's config)."""
    values = defaults()
    for name, value in _flatten(flat).items():
        if name not in KEY_BY_NAME:
            raise ConfigError(name, f"unknown key{_nearest(name)}")
        values[name] = _check_type(KEY_BY_NAME[name], value)
    _check_combinations(values, check_files)
    tree = Section()
    for name, value in values.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, Section())
        node[leaf] = value
    return tree


def _check_combinations(v: dict[str, Any], check_files: bool = True) -> None:
    if v["data.name"] in ("npz", "parquet") and not v["data.path"]:
        raise ConfigError("data.path", f"is required when data.name is {v['data.name']}")
    if check_files and v["data.path"] and v["data.name"] in ("npz", "parquet") and not Path(v["data.path"]).exists():
        raise ConfigError("data.path", f"file {v['data.path']} does not exist")
    if v["data.name"] == "synthetic":
        need = v["data.size"] * math.prod(v["data.shape"]) * 4
        if need > physical_memory():
            raise ConfigError("data.size", f"{v['data.size']} samples of shape {v['data.shape']} need "
                              f"{need / 2**30:,.1f} GiB, more than this host's {physical_memory() / 2**30:.0f} GiB")
    if v["train.momentum"] and not is_target(v["train.optimizer"]) and v["train.optimizer"].lower() not in MOMENTUM:
        raise ConfigError("train.momentum", f"applies to {', '.join(MOMENTUM)} only; {v['train.optimizer']} has "
                          f"its own (betas, set in train.optimizer_kwargs)")


def physical_memory() -> int:
    """This host's memory in bytes (what no single allocation can exceed)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


MOMENTUM = ("sgd", "rmsprop", "muon")  # the torch.optim classes with a momentum argument


def check_world(cfg: Section, world_size: int) -> None:
    """Checks that need the world size: the global batch must give every worker a sample."""
    if cfg.train.batch_size < world_size:
        raise ConfigError("train.batch_size", f"global batch {cfg.train.batch_size} is smaller than the "
                          f"world size {world_size}: every worker needs at least one sample per step")


def to_dict(cfg: Section) -> dict:
    """Plain nested dicts (for YAML, JSON and checkpoints)."""
    return {k: to_dict(v) if isinstance(v, dict) and not k.endswith("kwargs") else _copy(v) for k, v in cfg.items()}


def flat_items(cfg: dict, prefix: str = ""):
    for k, v in cfg.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in KEY_BY_NAME:
            yield from flat_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def describe() -> str:
    """The config reference, as Markdown (the README's table is made from this)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in KEYS:
        t = {int: "integer", float: "number", bool: "boolean", str: "string", list: "list", dict: "mapping"}[k.type] \
            + (" or null" if k.optional else "")
        sep = " \\| "
        meaning = k.help + (f" ({sep.join(k.choices)})" if k.choices else "")
        rows.append(f"| `{k.name}` | {t} | `{k.default!r}` | {meaning} |")
    return "\n".join(rows)
