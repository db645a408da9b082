"""The MLflow pyfunc flavour of a model folder: what the registry serves.

The `fit` stage logs every fitted model folder as an MLflow model (``log_model``) and registers
that, so

    mlflow.pyfunc.load_model("models:/patchcore-demo-weave@champion").predict(df)
    mlflow models serve -m "models:/patchcore-demo-weave@champion" --env-manager local -p 5001

work in any process with defectlab installed. The model is logged "from code" (this file is the
model's code, no pickled Python object) with the model folder as its one artifact; scoring goes
through ``defectlab.inference.Detector``, the same path as `defectlab predict`.

Input: a DataFrame with a string column ``image``: base64 of the encoded image file (PNG, JPEG,
...), or a column ``path`` of image paths readable by the serving process. Output: one row per
image with ``score`` (raw), ``normalized_score`` (0.5 = at the model's threshold), ``label``
(anomalous | normal) and ``error`` (why an image could not be read; its scores are then null).
REST: ``POST /invocations`` with ``{"dataframe_split": {"columns": ["image"], "data": [["<b64>"]]}}``.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow.pyfunc

ARTIFACT = "defectlab_model"     # the model folder's name inside the MLflow model's artifacts/


class DefectlabModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from defectlab.inference import Detector

        self.detector = Detector(context.artifacts[ARTIFACT], device="auto")

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from defectlab.errors import DatasetError

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" in df.columns:
            items = [base64.b64decode(v) if isinstance(v, str) else bytes(v) for v in df["image"]]
        elif "path" in df.columns:
            items = list(df["path"])
        else:
            raise ValueError(f"expected a column 'image' (base64 image bytes) or 'path'; got {list(df.columns)}")
        rows = []
        for item in items:      # one image at a time: a bad one is reported, the others scored
            try:
                out = self.detector.predict([item])
                rows.append({"score": float(out.scores[0]),
                             "normalized_score": None if out.normalized is None else float(out.normalized[0]),
                             "label": out.labels[0], "error": None})
            except DatasetError as err:
                rows.append({"score": None, "normalized_score": None, "label": None, "error": err.problem})
        return pd.DataFrame(rows, columns=["score", "normalized_score", "label", "error"])


def encode_image(path: str | Path) -> str:
    """An image file as the base64 string the ``image`` column takes."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "image")]),
                          outputs=Schema([ColSpec("double", "score"), ColSpec("double", "normalized_score"),
                                          ColSpec("string", "label"), ColSpec("string", "error")]))


def requirements() -> list[str]:
    """Pinned requirements of the serving environment (defectlab itself must be installed there:
    it is not on PyPI, so `mlflow models serve --env-manager local` from this project's venv)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "torchvision", "mlflow", "numpy", "pillow", "pandas")]


def log_model(model_dir: str | Path, name: str = "model", example_image: str | Path | None = None):
    """Log ``model_dir`` as an MLflow pyfunc model in the active run; returns MLflow's ModelInfo."""
    import mlflow
    import pandas as pd

    example = pd.DataFrame({"image": [encode_image(example_image)]}) if example_image else None
    return mlflow.pyfunc.log_model(name=name, python_model=str(Path(__file__).with_name("serving_model.py")),
                                   artifacts={ARTIFACT: str(model_dir)}, signature=signature(),
                                   input_example=example, pip_requirements=requirements())
