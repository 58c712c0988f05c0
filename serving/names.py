"""The names of tuneloop's Serve applications and deployments, and their routes. Pure."""

INGRESS_APP = "tuneloop"
INGRESS_DEPLOYMENT = "Ingress"


def model_app_name(model: str) -> str:
    return f"tuneloop-model-{model}"


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


def predict_route(model: str) -> str:
    return f"/v1/models/{model}/predict"
