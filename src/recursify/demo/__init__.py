"""``recursify demo``: the main job, end to end on the embedded default model, with a report."""

from recursify.demo.plan import DemoOptions
from recursify.demo.run import Demo, run_demo

__all__ = ["Demo", "DemoOptions", "run_demo"]
