"""The names of tuneloop's Ray actors, Serve applications and deployments, and their routes.
Pure: every layer may use them."""

INGRESS_APP = "tuneloop"
INGRESS_DEPLOYMENT = "Ingress"


def model_app_name(model: str) -> str:
    return f"tuneloop-model-{model}"


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


def predict_route(model: str) -> str:
    return f"/v1/models/{model}/predict"


# The retrain controller, a named actor. Named actors live in a namespace; Serve replicas
# run in Serve's, drivers in their own.
CONTROLLER_NAME = "tuneloop-retrain-controller"
CONTROLLER_NAMESPACE = "tuneloop"


def controller_name(config_digest: str) -> str:
    """The controller of one config (``TuneloopConfig.digest``): a changed config starts a
    controller of its own beside the old one, which finishes its job and leaves
    (control/apps.py), and the ingress of each config finds its own."""
    return f"{CONTROLLER_NAME}-{config_digest}"

# A custom resource that the node holding the feedback journal's persistent disk offers
# (deploy/ renders it on the head). Where a cluster has it, the ingress, the journal's one
# writer, and the controller are pinned there (serving/app.py, on_journal_node), so
# acknowledged feedback is always on that disk; where none offers it (one machine), they
# go anywhere.
JOURNAL_RESOURCE = "tuneloop-journal"
# The Serve application that keeps the controller alive (control/apps.py).
CONTROLLER_APP = "tuneloop-controller"
CONTROLLER_DEPLOYMENT = "RetrainControllerKeeper"


def deploy_failures(applications: dict, apps: list[str]) -> list[str]:
    """``name: why`` for each of ``apps`` that Serve could not deploy (``applications``:
    ``serve.status().applications``; a status is a str enum)."""
    return [f"{name}: {_why(status)}" for name in apps
            if (status := applications.get(name)) is not None and status.status == "DEPLOY_FAILED"]


def _why(app_status) -> str:
    """The application's message, with its failed deployments' own (their replica's
    traceback, of which the last line says what failed)."""
    lines = [d.message.strip().splitlines()[-1] for d in getattr(app_status, "deployments", {}).values()
             if d.status in ("DEPLOY_FAILED", "UNHEALTHY") and (d.message or "").strip()]
    return "; ".join(part for part in [app_status.message, *lines] if part)


def not_running(applications: dict, apps: list[str]) -> list[str]:
    """``name (status)`` for each of ``apps`` that is not running (yet)."""
    return [f"{name} ({status.status if status is not None else 'not deployed'})" for name in apps
            if (status := applications.get(name)) is None or status.status != "RUNNING"]


def running_replicas(applications: dict, model: str) -> int:
    """A model's running replicas in ``serve.status().applications`` (0 when not deployed)."""
    app_status = applications.get(model_app_name(model))
    deployment = app_status.deployments.get(model_deployment_name(model)) if app_status else None
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0
