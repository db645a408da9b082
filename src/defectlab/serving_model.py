"""The code of every logged defectlab MLflow model (MLflow "models from code"): the model object
is built here at load time, nothing is unpickled. See defectlab.serving."""

from mlflow.models import set_model

from defectlab.serving import DefectlabModel

set_model(DefectlabModel())
