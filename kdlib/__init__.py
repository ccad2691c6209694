"""kdlib: distill big, slow teachers into small, fast students on one domain-agnostic core.

Importing kdlib never needs the native extension ``kdlib._C`` or Triton: without them the plain
PyTorch paths run and ``kdlib info`` says what is missing and how to get it.
"""

__version__ = "0.1.0"
