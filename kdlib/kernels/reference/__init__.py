"""Plain-PyTorch references: short, obviously right, the specification each fast kernel is tested against."""
