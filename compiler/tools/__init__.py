"""Tooling around the compiler: the bench (`cnnc bench`), the differential fuzzer (`cnnc fuzz`)
and the worker processes both run their children in.

Nothing in the core (`cnnc` and its passes, backends and frontends) imports this package;
the CLI imports it only when one of its commands runs.
"""
