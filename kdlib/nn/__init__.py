"""kdlib.nn"""
