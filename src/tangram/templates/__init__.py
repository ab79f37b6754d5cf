"""Traced start-up templates: load in first-use order, execute while loading, warm operators early."""

from tangram.templates.overlap import WaitForWeights
from tangram.templates.record import Recorder, names_by_param
from tangram.templates.template import Template, checkpoint_id, libraries, load_template, save_template
from tangram.templates.warm import warm

__all__ = ["Recorder", "Template", "WaitForWeights", "checkpoint_id", "libraries", "load_template",
           "names_by_param", "save_template", "warm"]
