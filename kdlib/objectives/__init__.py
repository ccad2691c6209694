"""kdlib.objectives"""
