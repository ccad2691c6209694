"""Domains: data, teacher and student builders, metrics and recipes, one package per domain."""
