"""Using a trained run: evaluate it again, predict with it, and describe this environment.

    dist-train eval RUN_DIR [--data FILE]          loss/accuracy on the run's held-out rows (or on FILE)
    dist-train predict RUN_DIR INPUT --out P.parquet
    dist-train export RUN_DIR --format onnx|torchscript [--out FILE]
    dist-train info                                 versions and devices, for a bug report
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from . import config, data, device, usercode
from .comm import LocalComm
from .data import WorkerData
from .data.items import from_jsonable, jsonable
from .errors import DataError, UserError, first_line
from .files import atomic
from .launchers.args import find_executable
from .train import losses, metrics
from .train.evaluate import evaluate
from .train.losses import predict as to_predictions
from .train.outputs import load_model_file, model_from_payload


def load_run(run_dir: str | Path, trust_code: bool = False):
    """(config, model in eval mode, meta) from a run's model.pt. A config naming user code
    is refused unless `trust_code`: importing a module runs it."""
    payload = load_model_file(run_dir)
    cfg = config.build(dict(config.flat_items(payload["config"])), check_files=False)
    usercode.refuse_untrusted(cfg, f"{run_dir}/model.pt", trust_code)
    if str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # the user's modules, from where the run was started
    return model_from_payload(payload, str(run_dir), cfg)


def evaluate_run(run_dir: str | Path, data_path: str | None = None, trust_code: bool = False) -> dict:
    """Loss and metrics of a run's model: on its held-out rows, or on every row of `data_path`
    (checked as training checks its data: labels the model can score, one line if not)."""
    cfg, model, meta = load_run(run_dir, trust_code)
    if data_path is not None:
        if not Path(data_path).exists():
            raise DataError(f"--data {data_path} does not exist")
        kind = "parquet" if str(data_path).endswith(".parquet") or Path(data_path).is_dir() else "npz"
        cfg = config.build({**dict(config.flat_items(config.to_dict(cfg))), "data.name": kind, "data.target": None,
                            "data.path": str(data_path), "data.eval_fraction": 0.0})
    ds = data.load(cfg)
    shape = tuple(from_jsonable(meta["sample_shape"]))
    if ds.sample_shape != shape:
        if isinstance(ds, data.Items) or math.prod(ds.sample_shape) != math.prod(shape):
            raise DataError(f"{'--data ' + str(data_path) if data_path else ds.name}: samples of shape "
                            f"{jsonable(ds.sample_shape)} do not fit the model's {meta['sample_shape']}")
        ds.x = ds.x.reshape(len(ds.x), *shape)  # flat rows for an image model, as predict takes them
    if isinstance(ds, data.Items):
        ds.outputs, worker = meta["outputs"], ds
    else:
        if data_path is not None:
            _check_labels(f"--data {data_path}", ds.y, meta)
        worker = WorkerData.whole(ds, meta["outputs"])
    loss = losses.resolve(cfg.train.loss)
    result = evaluate(cfg, LocalComm(), model, worker, torch.device("cpu"), loss,
                      metrics.resolve(cfg.train.metrics, loss))
    return {**result, "split": "data"} if data_path is not None else result  # every row of --data


def _check_labels(where: str, y: np.ndarray, meta: dict) -> None:
    """Labels the run's model can be scored on (DataError otherwise)."""
    if meta["loss"] == "cross_entropy" and len(y):
        if y.dtype.kind not in "iu":
            raise DataError(f"{where}: the model predicts classes, the labels are floats in "
                            f"[{float(y.min()):g}, {float(y.max()):g}]")
        if y.min() < 0 or y.max() >= meta["outputs"]:
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise DataError(f"{where}: label {bad} is out of range for the model's {meta['outputs']} classes")


def read_inputs(path: str | Path, sample_shape, label_column: str) -> np.ndarray:
    """Features from .npz (array x) or Parquet (every column but the label), shaped for the model."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as z:
            key = next((k for k in ("x", "X", "features") if k in z.files), None)
            if key is None:
                raise DataError(f"{path}: needs an array 'x', found {z.files}")
            x = z[key]
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables([pq.read_table(f) for f in data.parquet_files(path)])
        if label_column not in table.schema.names:
            table = table.append_column(label_column, pa.array(np.zeros(table.num_rows, np.int64)))
        x, _ = data.table_to_arrays(table, label_column, str(path), strings=True)  # the label is not read here
    x = np.asarray(x, dtype=np.float32)
    try:
        return x.reshape(len(x), *sample_shape)
    except ValueError:
        raise DataError(f"{path}: rows of {int(np.prod(x.shape[1:]))} values do not fit the model's "
                        f"samples of shape {list(sample_shape)}") from None


PREDICT_FORMATS = (".parquet", ".csv")


def predict_run(run_dir: str | Path, inputs: str | Path, out: str | Path, batch_size: int = 1024,
                trust_code: bool = False, probabilities: bool = False) -> int:
    """Write predictions (class ids, or the class names of string labels; 0/1; or values)
    for every input row to a Parquet or CSV file (by its suffix), with each class's
    probability if asked. Written whole or not at all."""
    out = writable(out, PREDICT_FORMATS, "predictions")
    cfg, model, meta = load_run(run_dir, trust_code)
    if probabilities and losses.probabilities(meta["loss"], torch.zeros(1, 1)) is None:
        raise UserError(f"--probabilities: this model's outputs are values (train.loss {meta['loss']}), not classes")
    x = read_inputs(inputs, tuple(meta["sample_shape"]), cfg.data.label_column)
    preds, probs = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outputs = model(torch.from_numpy(x[i:i + batch_size]))
            preds.append(to_predictions(meta["loss"], outputs).numpy())
            if probabilities:
                probs.append(losses.probabilities(meta["loss"], outputs).numpy())
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    names = cfg.data.label_map if meta["loss"] == "cross_entropy" else None
    columns = {"row": np.arange(len(x), dtype=np.int64)}
    if pred.ndim > 1 and out.suffix.lower() == ".csv":  # a CSV cell holds one value: a column per output
        columns.update({f"prediction_{j}": pred[:, j] for j in range(pred.shape[1])})
    else:
        columns["prediction"] = np.asarray(names, dtype=object)[pred] if names else pred
    if probabilities:
        p = np.concatenate(probs) if probs else np.zeros((0, meta["outputs"]), np.float32)
        classes = names or [str(c) for c in range(p.shape[1])]
        columns.update({f"p_{c}": p[:, j] for j, c in enumerate(classes)})
    _write_table(columns, out)
    return len(x)


def writable(out: str | Path, suffixes: tuple[str, ...] = (), what: str = "") -> Path:
    """`out` as a file this command may write: one of `suffixes` (if given), not a
    directory, in a directory that exists and can be written (UserError saying which is not so)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name")
    if suffixes and out.suffix.lower() not in suffixes:
        raise UserError(f"--out {out}: {what} are written as {' or '.join(suffixes)}; name the file so")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--out {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: directory {parent} is not writable")
    return out


def _write_table(columns: dict, out: Path) -> None:
    import pyarrow as pa

    table = pa.table({k: pa.array(list(v)) if getattr(v, "ndim", 1) > 1 else pa.array(v) for k, v in columns.items()})
    try:
        with atomic(out) as f:  # like every other output
            if out.suffix.lower() == ".csv":
                import pyarrow.csv

                pyarrow.csv.write_csv(table, f)
            else:
                import pyarrow.parquet as pq

                pq.write_table(table, f)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


EXPORT_SUFFIX = {"torchscript": ".ts.pt", "onnx": ".onnx"}


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, trust_code: bool = False) -> Path:
    """Write the run's model as TorchScript (`torch.jit.load`) or ONNX (opset 17), with a
    variable batch dimension; the file is written whole or not at all."""
    import warnings

    cfg, model, meta = load_run(run_dir, trust_code)
    out = writable(out if out else Path(run_dir) / f"model{EXPORT_SUFFIX[fmt]}")
    example = torch.zeros(2, *meta["sample_shape"])
    try:
        with atomic(out) as f, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit and the TorchScript-based ONNX exporter warn that they age
            if fmt == "torchscript":
                try:
                    scripted = torch.jit.script(model)  # keeps control flow
                except Exception:  # noqa: BLE001 - not scriptable: record the ops one batch runs
                    scripted = torch.jit.trace(model, example)
                torch.jit.save(scripted, f)
            else:
                torch.onnx.export(model, (example,), f, dynamo=False, opset_version=17,
                                  input_names=["x"], output_names=["y"],
                                  dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - one line naming the model and the cause
        raise UserError(f"cannot export {cfg.model.target or cfg.model.name} to {fmt}: {first_line(e)}") from None
    return out


def info() -> dict:
    """What a bug report needs: versions, threads, MPI and Spark, devices."""
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    def first_line(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return ((p.stdout or p.stderr).strip().splitlines() or [""])[0]
        except (OSError, subprocess.TimeoutExpired):
            return None

    mpirun = find_executable("mpirun")
    java = shutil.which("java")
    return {
        "dist_train": version("dist-train"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cores_available": device.host_cores(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mpi4py": version("mpi4py"),
        "mpirun": mpirun,
        "mpi_implementation": first_line([mpirun, "--version"]) if mpirun else None,
        "pyspark": version("pyspark"),
        "java": first_line([java, "-version"]) if java else None,
        "pyarrow": version("pyarrow"),
    }


def print_info() -> None:
    print(json.dumps(info(), indent=2))
