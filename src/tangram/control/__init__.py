"""Control plane: deployments, dispatch, autoscaling (placement: tangram.scheduler)."""

from tangram.control.controller import Controller, DeploymentUnavailable, UnknownDeployment
from tangram.control.deployments import Deployment, ServeConfig
from tangram.control.adapters import LoraController  # after Controller: it extends it

__all__ = ["Controller", "Deployment", "DeploymentUnavailable", "LoraController", "ServeConfig", "UnknownDeployment"]
