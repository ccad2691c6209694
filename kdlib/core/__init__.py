"""kdlib.core"""
