"""Using a trained run: evaluate it again, predict with it, and describe this environment.

    dist-train eval RUN_DIR [--data FILE]          loss/accuracy on the run's held-out rows (or on FILE)
    dist-train predict RUN_DIR INPUT --out P.parquet
    dist-train export RUN_DIR --format onnx|torchscript [--out FILE]
    dist-train info                                 versions and devices, for a bug report
"""

from __future__ import annotations

import importlib.metadata
import json
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
from .launchers.common import find_executable
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
    """Loss and metrics of a run's model: on its held-out rows, or on every row of `data_path`."""
    cfg, model, meta = load_run(run_dir, trust_code)
    if data_path is not None:
        kind = "parquet" if str(data_path).endswith(".parquet") or Path(data_path).is_dir() else "npz"
        cfg = config.build({**dict(config.flat_items(config.to_dict(cfg))), "data.name": kind, "data.target": None,
                            "data.path": str(data_path), "data.eval_fraction": 0.0})
    ds = data.load(cfg)
    if ds.sample_shape != from_jsonable(meta["sample_shape"]):
        raise DataError(f"samples of shape {jsonable(ds.sample_shape)} do not fit the model's {meta['sample_shape']}")
    if isinstance(ds, data.Items):
        ds.outputs, worker = meta["outputs"], ds
    else:
        worker = WorkerData.whole(ds, meta["outputs"])
    loss = losses.resolve(cfg.train.loss)
    return evaluate(cfg, LocalComm(), model, worker, torch.device("cpu"), loss, metrics.resolve(cfg.train.metrics, loss))


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
        x, _ = data.table_to_arrays(table, label_column, str(path))
    x = np.asarray(x, dtype=np.float32)
    try:
        return x.reshape(len(x), *sample_shape)
    except ValueError:
        raise DataError(f"{path}: rows of {int(np.prod(x.shape[1:]))} values do not fit the model's "
                        f"samples of shape {list(sample_shape)}") from None


def predict_run(run_dir: str | Path, inputs: str | Path, out: str | Path, batch_size: int = 1024,
                trust_code: bool = False) -> int:
    """Write predictions (class ids, 0/1, or values) for every input row to a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, model, meta = load_run(run_dir, trust_code)
    x = read_inputs(inputs, tuple(meta["sample_shape"]), cfg.data.label_column)
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            preds.append(to_predictions(meta["loss"], model(torch.from_numpy(x[i:i + batch_size]))).numpy())
    pred = np.concatenate(preds) if preds else np.zeros(0)
    column = pa.array(pred) if pred.ndim == 1 else pa.array(list(pred))
    table = pa.table({"row": np.arange(len(x), dtype=np.int64), "prediction": column})
    with atomic(out) as f:  # like every other output
        pq.write_table(table, f)
    return len(x)


EXPORT_SUFFIX = {"torchscript": ".ts.pt", "onnx": ".onnx"}


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, trust_code: bool = False) -> Path:
    """Write the run's model as TorchScript (`torch.jit.load`) or ONNX (opset 17), with a
    variable batch dimension; the file is written whole or not at all."""
    import warnings

    cfg, model, meta = load_run(run_dir, trust_code)
    out = Path(out) if out else Path(run_dir) / f"model{EXPORT_SUFFIX[fmt]}"
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
