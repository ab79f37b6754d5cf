"""Control plane: deployments, dispatch, autoscaling (placement: tangram.scheduler)."""

from tangram.control.controller import Controller, DeploymentUnavailable, UnknownDeployment
from tangram.control.deployments import Deployment, ServeConfig

__all__ = ["Controller", "Deployment", "DeploymentUnavailable", "ServeConfig", "UnknownDeployment"]
