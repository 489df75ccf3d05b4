"""Tooling around the compiler: the bench (`cnnc bench`) and its peer engines (`engines/`), the
tuner, the differential fuzzer (`cnnc fuzz`) and the worker processes they run children in.

Nothing in the core (`cnnc` and its passes, backends and frontends) imports this package;
the CLI imports it only when one of its commands runs.
"""
