"""Model files in, op graphs out: `cnnc.frontend.load(path)` reads the YAML model format."""

from cnnc.frontend.yaml_model import load

__all__ = ["load"]
