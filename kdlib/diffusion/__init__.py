"""kdlib.diffusion"""
