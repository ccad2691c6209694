"""kdlib.metrics"""
