"""kdlib.methods"""
