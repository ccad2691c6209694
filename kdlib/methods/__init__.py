"""Distillation methods, one file each, registered by name (``kdlib.core.method.METHODS``).

Modules here are imported on the first registry lookup, so adding a method is adding a file.
"""
