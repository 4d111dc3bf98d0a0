"""Spark ML's own shape: an Estimator whose `fit(df)` trains with the barrier launcher, and
the Model it returns, whose `transform(df)` predicts on the executors.

    from pyspark.ml import Pipeline
    from pyspark.ml.feature import VectorAssembler
    from dist_train.spark import DistTrainEstimator

    assembler = VectorAssembler(inputCols=[f"p{i}" for i in range(64)], outputCol="features")
    estimator = DistTrainEstimator(config="conf/digits.yaml", sets=["train.epochs=20"], workers=2)
    model = Pipeline(stages=[assembler, estimator]).fit(train_df)
    model.transform(test_df).select("label", "prediction", "probability")
    model.write().save("/shared/models/digits")      # PipelineModel.load(...) gives it back

Features are an array column, a Spark ML Vector column, or a list of numeric columns
(`featuresCol=["a", "b"]`). The model reaches the executors once, inside the prediction
UDF (Spark broadcasts a UDF's payload above 1 MB); each Python worker builds the module
once and predicts Arrow batch by Arrow batch, so nothing is collected to the driver.
Classifiers (cross_entropy, or bce with one output) add `predictionCol` (a double, as Spark
ML's classifiers do) and `probabilityCol` (a Vector); other models add `predictionCol`
(a double for one output, else an array). Estimator and Model persist through Spark ML's
`write().save(path)` / `load(path)` (the weights in a Parquet file beside the Params), so
they work inside a saved Pipeline. Loading a model imports the modules its config names,
as Spark ML's own loading imports the stage classes its metadata names: load only models
you trust.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Iterator

from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsReader, DefaultParamsWritable, DefaultParamsWriter
from pyspark.ml.util import MLReadable, MLReader, MLWritable, MLWriter

from ... import config, usercode
from ...errors import ConfigError
from ...train.checkpoint import load_bytes, to_bytes
from ...train.outputs import model_from_payload

CLASSIFIER_LOSSES = ("cross_entropy", "bce")
PREDICT_ROWS = 4096  # rows per forward pass on an executor


def _features_param(value):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"featuresCol must be a column name or a list of column names, got {value!r}")


def _config_param(value):
    if value is None or isinstance(value, dict):
        return value
    return str(value)


class _Params(Params):
    config = Param(Params._dummy(), "config", "a dist-train config: a YAML path or a dict of keys",
                   typeConverter=_config_param)
    sets = Param(Params._dummy(), "sets", "KEY=VALUE overrides, as --set takes them",
                 typeConverter=TypeConverters.toListString)
    featuresCol = Param(Params._dummy(), "featuresCol", "an array column, a Vector column, or a list of "
                        "numeric columns", typeConverter=_features_param)
    labelCol = Param(Params._dummy(), "labelCol", "label column name", typeConverter=TypeConverters.toString)
    predictionCol = Param(Params._dummy(), "predictionCol", "prediction column name",
                          typeConverter=TypeConverters.toString)
    probabilityCol = Param(Params._dummy(), "probabilityCol", "class probabilities column name (classifiers)",
                           typeConverter=TypeConverters.toString)
    workers = Param(Params._dummy(), "workers", "barrier tasks (spark.workers; unset: the config's)",
                    typeConverter=TypeConverters.toInt)
    outDir = Param(Params._dummy(), "outDir", "where the run's files go (a path every executor shares; "
                   "unset: none are written)", typeConverter=TypeConverters.toString)

    def __init__(self):
        super().__init__()
        self._setDefault(sets=[], featuresCol="features", labelCol="label", predictionCol="prediction",
                         probabilityCol="probability")

    def _set_given(self, kwargs: dict) -> None:
        self._set(**{k: v for k, v in kwargs.items() if v is not None})

    def _features(self, df):
        """The features as one array<float> column (`__features`), whatever form they come in."""
        from pyspark.sql import functions as F

        names = self.getOrDefault("featuresCol")
        kinds = dict(df.dtypes)
        cols = names if isinstance(names, list) else [names]
        missing = [c for c in cols if c not in kinds]
        if missing:
            raise ConfigError("featuresCol", f"no column {missing[0]!r} in the DataFrame (columns: "
                              f"{', '.join(df.columns)})")
        if isinstance(names, list):
            return F.array(*[F.col(c).cast("float") for c in names])
        if kinds[names] == "vector":
            from pyspark.ml.functions import vector_to_array

            return vector_to_array(F.col(names), "float32")
        return F.col(names)


class DistTrainEstimator(_Params, Estimator, DefaultParamsWritable, DefaultParamsReadable):
    """`fit(df)` trains the config on the DataFrame's rows with the Spark barrier launcher
    (shard sampling, `workers` tasks) and returns a DistTrainModel."""

    def __init__(self, *, config=None, sets=None, featuresCol=None, labelCol=None, predictionCol=None,
                 probabilityCol=None, workers=None, outDir=None):
        super().__init__()
        self._set_given(dict(config=config, sets=sets, featuresCol=featuresCol, labelCol=labelCol,
                             predictionCol=predictionCol, probabilityCol=probabilityCol, workers=workers,
                             outDir=outDir))

    def setParams(self, **kwargs):
        self._set_given(kwargs)
        return self

    def load_config(self):
        """The run's config: the `config` Param, `sets`, the label column and `workers`."""
        given = self.getOrDefault("config") if self.isDefined("config") else None
        sets = [*self.getOrDefault("sets"), f"data.label_column={self.getOrDefault('labelCol')}"]
        if self.isDefined("workers"):
            sets.append(f"spark.workers={self.getOrDefault('workers')}")
        if isinstance(given, dict):
            flat = dict(config.flat_items(given))
            for text in sets:
                key, value = config.parse_override(text)
                flat[key] = value
            return config.build(flat)
        if given is not None:
            usercode.search_config_dir(given)
        return config.load(given, sets)

    def _fit(self, df):
        from . import driver

        cfg = self.load_config()
        label = self.getOrDefault("labelCol")
        if label not in df.columns:
            raise ConfigError("labelCol", f"no column {label!r} in the DataFrame (columns: {', '.join(df.columns)})")
        if label == "features":
            raise ConfigError("labelCol", "cannot be 'features' (the name dist-train gives the feature column)")
        rows = df.select(self._features(df).alias("features"), df[label])
        out = self.getOrDefault("outDir") if self.isDefined("outDir") else None
        result = driver.train(df.sparkSession, cfg, df=rows, out_dir=out)
        model = DistTrainModel(payload=result.model_payload(cfg))
        return self._copyValues(model)


class DistTrainModel(_Params, Model, MLWritable, MLReadable):
    """A trained dist-train model as a Spark ML Model: `transform(df)` predicts on the
    executors; `torch_model()` gives the torch.nn.Module back."""

    def __init__(self, *, payload: dict | None = None, **params):
        super().__init__()
        self._payload = payload
        self._set_given(params)

    def setParams(self, **kwargs):
        self._set_given(kwargs)
        return self

    @property
    def meta(self) -> dict:
        return self._payload["meta"]

    def torch_model(self):
        """The trained torch.nn.Module (eval mode, on the CPU)."""
        return model_from_payload(self._payload, "DistTrainModel")[1]

    def _is_classifier(self) -> bool:
        return self.meta["loss"] == "cross_entropy" or (self.meta["loss"] == "bce" and self.meta["outputs"] == 1)

    def _transform(self, df):
        import pandas as pd
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F

        prediction, probability = self.getOrDefault("predictionCol"), self.getOrDefault("probabilityCol")
        classifier = self._is_classifier()
        one = classifier or self.meta["outputs"] == 1
        schema = "prediction double" if one else "prediction array<double>"
        if classifier:
            schema += ", probability array<double>"
        predictor = _Predictor(to_bytes(self._payload), classifier, one)

        def predict(batches):
            yield from predictor(batches)

        # an iterator UDF: the model is built once per task, not once per batch (hints as objects: pandas is local)
        predict.__annotations__ = {"batches": Iterator[pd.Series], "return": Iterator[pd.DataFrame]}

        predict = F.pandas_udf(predict, schema).asNondeterministic()
        out = df.withColumn("__dist_train", predict(self._features(df)))  # nondeterministic: evaluated once
        out = out.withColumn(prediction, F.col("__dist_train.prediction"))
        if classifier:
            out = out.withColumn(probability, array_to_vector(F.col("__dist_train.probability")))
        return out.drop("__dist_train")

    def copy(self, extra=None):
        that = super().copy(extra)
        that._payload = self._payload
        return that

    def write(self) -> MLWriter:
        return _ModelWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _ModelReader(cls)


_BUILT: dict[str, object] = {}  # per Python worker: the module of each model, built once


class _Predictor:
    """The pandas UDF (iterator of Series -> iterator of DataFrames) that runs the model on
    Arrow batches on an executor."""

    def __init__(self, blob: bytes, classifier: bool, one: bool):
        self.blob, self.classifier, self.one = blob, classifier, one
        self.key = hashlib.sha256(blob).hexdigest()

    def __call__(self, batches):
        import numpy as np
        import pandas as pd
        import torch

        if self.key not in _BUILT:
            _BUILT.clear()  # one model at a time per worker
            _BUILT[self.key] = model_from_payload(load_bytes(self.blob), "DistTrainModel")[1:]
        model, meta = _BUILT[self.key]
        shape = tuple(meta["sample_shape"])
        for series in batches:
            x = np.stack(series.to_numpy()).astype(np.float32) if len(series) else np.zeros((0, *shape), np.float32)
            outs = []
            with torch.no_grad():
                for at in range(0, len(x), PREDICT_ROWS):
                    outs.append(model(torch.from_numpy(x[at:at + PREDICT_ROWS].reshape(-1, *shape))))
            raw = torch.cat(outs) if outs else torch.zeros(0, meta["outputs"])
            frame = {}
            if self.classifier and meta["loss"] == "cross_entropy":
                frame["prediction"] = raw.argmax(1).double().numpy()
                frame["probability"] = list(torch.softmax(raw.double(), 1).numpy())
            elif self.classifier:  # bce, one output: P(1) = sigmoid
                p = torch.sigmoid(raw.double()[:, 0])
                frame["prediction"] = (raw[:, 0] > 0).double().numpy()
                frame["probability"] = list(torch.stack([1 - p, p], 1).numpy())
            elif self.one:
                frame["prediction"] = raw.double().reshape(len(raw), -1)[:, 0].numpy()
            else:
                frame["prediction"] = list(raw.double().reshape(len(raw), -1).numpy())
            yield pd.DataFrame(frame)


# ---------------------------------------------------------------- persistence

WEIGHTS_CHUNK = 16 << 20


class _ModelWriter(MLWriter):
    """Params as Spark ML writes them (path/metadata), the payload as Parquet (path/weights):
    both through the session, so any filesystem Spark writes to will do."""

    def __init__(self, instance: DistTrainModel):
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sparkSession,
                                         extraMetadata={"dist_train": json.dumps({"format": 1})})
        blob = to_bytes(self.instance._payload)
        chunks = [(i, blob[at:at + WEIGHTS_CHUNK]) for i, at in enumerate(range(0, len(blob), WEIGHTS_CHUNK))]
        self.sparkSession.createDataFrame(chunks, "chunk int, payload binary").coalesce(1).write.parquet(
            f"{path}/weights")


class _ModelReader(MLReader):
    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> DistTrainModel:
        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        rows = self.sparkSession.read.parquet(f"{path}/weights").collect()
        blob = b"".join(r["payload"] for r in sorted(rows, key=lambda r: r["chunk"]))
        model = self.cls(payload=load_bytes(blob))
        DefaultParamsReader.getAndSetParams(model, metadata)
        model._resetUid(metadata["uid"])
        return model


# ---------------------------------------------------------------- dist-train predict --spark


def predict_parquet(spark, run_dir, inputs: str, out: str, trust_code: bool = False) -> int:
    """Predictions of a run's model for a Parquet path of any size, computed on the executors
    and written by them to the Parquet directory `out`: the input's global row index `row`
    (its row order, file by file, as `dist-train predict` numbers rows), every input column
    but the features, `prediction`, and for classifiers `probability` (an array)."""
    from pathlib import Path

    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    from ... import data
    from ...errors import UserError
    from ...train.outputs import load_model_file
    from . import feed

    payload = load_model_file(run_dir)
    cfg = config.build(dict(config.flat_items(payload["config"])), check_files=False)
    usercode.refuse_untrusted(cfg, f"{run_dir}/model.pt", trust_code)
    if Path(out).exists():
        raise UserError(f"--out {out} exists: predictions go to a new directory")
    files = data.parquet_files(inputs)
    data.check_parquet_schemas(files)
    df = spark.read.parquet(*[str(Path(f).resolve()) for f in files])
    label = cfg.data.label_column
    features = data.feature_columns(df.columns, label, str(inputs))
    model = DistTrainModel(payload=payload, featuresCol=features[0] if len(features) == 1 else features)
    shape = model.meta["sample_shape"]
    if len(features) > 1 and len(features) != math.prod(shape):
        raise UserError(f"{inputs}: {len(features)} feature columns do not fit the model's samples of shape {shape}")
    rows = feed.with_row_index(df, files).withColumnRenamed(feed.ROW, "row")
    predicted = model.transform(rows).drop(*features)
    if model._is_classifier():
        predicted = predicted.withColumn("probability", vector_to_array(F.col("probability")))
    predicted.write.parquet(str(out))
    return spark.read.parquet(str(out)).count()
